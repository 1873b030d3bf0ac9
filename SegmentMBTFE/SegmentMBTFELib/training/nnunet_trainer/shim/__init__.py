"""Holds only the module nnU-Net imports to find the MBTFE trainers (see ../__init__.py)."""
