"""moe.tasks"""
