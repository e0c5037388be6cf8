"""Kernel seams. Each op has a plain-PyTorch reference here (the test oracle); fast versions live
beside it and are chosen by ``nemotron_core.backend``. Nothing here imports an optional package at
module top level."""
