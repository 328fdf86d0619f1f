"""moe.sharding"""
