"""The machine: devices, CPU kernels and threads, precision, memory, and lean imports."""
