"""Trainer loop, optimizer and schedule, metrics."""
