"""moe.accel"""
