"""moe.profiling"""
