"""Denoising diffusion: noise schedules and closed forms (schedules.py), the DDPM and DDIM samplers
with classifier-free guidance (samplers.py), and the trainable model (model.py, kind "ddpm")."""
