"""performer_triton"""
