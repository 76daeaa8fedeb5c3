"""Overhead benchmarks for ktrace (`make bench`)."""
