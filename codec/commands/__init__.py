"""codec/commands"""
