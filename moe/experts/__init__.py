"""moe.experts"""
