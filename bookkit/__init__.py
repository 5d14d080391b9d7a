"""The book's machinery, apart from the science in ``lib``: what runs and checks the chapters, not what they compute.

Nothing in ``lib`` imports it.
"""
