"""Serving plans: the lookup policy, the process Session, and conv2d."""
