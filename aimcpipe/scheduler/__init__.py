"""aimcpipe.scheduler"""
