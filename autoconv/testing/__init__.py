"""Test doubles shipped with autoconv: the CUDA simulator (cuda_simulator) and FakeCupy
(fake_cupy), which let the CUDA backend's whole path run without a GPU. They check semantics,
never speed."""
