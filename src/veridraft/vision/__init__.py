"""Qwen2-VL / Qwen2.5-VL vision side: preprocessing, the vision tower, M-RoPE position ids.

`processor` turns chat-message images and videos into the flattened patch rows and grids the
vision tower reads, `encoder` is the tower itself (loaded from the `visual.*` tensors of a
checkpoint), `positions` computes the three-stream (t, h, w) rotary positions of a prompt.
"""
