"""aimcpipe.analog"""
