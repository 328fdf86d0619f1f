"""moe.bindings"""
