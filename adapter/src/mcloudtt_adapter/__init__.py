"""MCloudTT adapter."""
