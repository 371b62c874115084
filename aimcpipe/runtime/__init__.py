"""aimcpipe.runtime"""
