"""aimcpipe.stages"""
