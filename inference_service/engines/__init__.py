"""Inference engines: plain domain classes around faster-whisper, Silero VAD and Demucs."""

from __future__ import annotations

from inference_service.engines.device import DeviceChoice, choose_device

__all__ = ["DeviceChoice", "choose_device"]
