"""Test oracle: the original HTS-AT eval forward, run directly on an original-layout state dict.

Written from the description of the authors' code (../shared/notes/original_htsat_details.md), independently of the
package: a torchlibrosa-style convolutional STFT with a numpy Slaney filter bank, the original attention arithmetic
(scaled query, bias added, mask viewed per image) and the original token-semantic head. It is checked against the
authors' own outputs in `test_reference_oracle_matches_fixture`, then used to check conversions of other sizes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.audio_utils import mel_filter_bank


def front_end_tensors(sampling_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> dict:
    """The frozen tensors torchlibrosa stores: DFT conv kernels (with the Hann window) and the mel matrix."""
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    freqs = np.arange(n_fft // 2 + 1)
    angle = 2 * np.pi * np.outer(freqs, n) / n_fft
    conv_real = torch.tensor(np.cos(angle) * window, dtype=torch.float32)[:, None, :]
    conv_imag = torch.tensor(-np.sin(angle) * window, dtype=torch.float32)[:, None, :]
    mel = mel_filter_bank(n_fft // 2 + 1, n_mels, f_min, f_max, sampling_rate, norm="slaney", mel_scale="slaney")
    return {
        "spectrogram_extractor.stft.conv_real.weight": conv_real,
        "spectrogram_extractor.stft.conv_imag.weight": conv_imag,
        "logmel_extractor.melW": torch.tensor(mel, dtype=torch.float32),
    }


def log_mel(sd: dict, waveform: torch.Tensor, hop: int) -> torch.Tensor:
    """(batch, samples) -> (batch, 1, frames, mel) as torchlibrosa Spectrogram + LogmelFilterBank."""
    n_fft = sd["spectrogram_extractor.stft.conv_real.weight"].shape[-1]
    x = F.pad(waveform[:, None, :], (n_fft // 2, n_fft // 2), mode="reflect")
    real = F.conv1d(x.double(), sd["spectrogram_extractor.stft.conv_real.weight"].double(), stride=hop)
    imag = F.conv1d(x.double(), sd["spectrogram_extractor.stft.conv_imag.weight"].double(), stride=hop)
    power = (real**2 + imag**2).transpose(1, 2)  # (batch, frames, freq)
    mel = power @ sd["logmel_extractor.melW"].double()
    return (10 * torch.log10(torch.clamp(mel, min=1e-10))).float()[:, None]


def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def _partition(x, ws):
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def _reverse(windows, ws, h, w):
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def _rel_index(ws):
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def _shift_mask(h, ws, shift):
    img = torch.zeros((1, h, h, 1))
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = _partition(img, ws).view(-1, ws * ws)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


def _block(x, sd, p, h, ws, shift, heads):
    b, l, c = x.shape
    shortcut = x
    x = _layer_norm(x, sd, p + "norm1").view(b, h, h, c)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    win = _partition(x, ws).view(-1, ws * ws, c)
    bw, n, _ = win.shape
    qkv = F.linear(win, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
    qkv = qkv.reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
    attn = q @ k.transpose(-2, -1)
    table = sd[p + "attn.relative_position_bias_table"]
    bias = table[_rel_index(ws).view(-1)].view(n, n, -1).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if shift:
        mask = _shift_mask(h, ws, shift)
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
    out = F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = _reverse(out.view(-1, ws, ws, c), ws, h, h)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + x.reshape(b, h * h, c)
    y = _layer_norm(x, sd, p + "norm2")
    y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + y


def original_forward(sd: dict, waveform: torch.Tensor, hop: int, spec_size: int, window: int, patch: int) -> dict:
    """Eval forward of the original `HTSAT_Swin_Transformer` (inputs of at most one image)."""
    x = log_mel(sd, waveform, hop)  # (B, 1, T, F)
    mel_bins = x.shape[-1]
    x = x.transpose(1, 3)
    x = F.batch_norm(x, sd["bn0.running_mean"], sd["bn0.running_var"], sd["bn0.weight"], sd["bn0.bias"], False, 0.0, 1e-5)
    x = x.transpose(1, 3)
    ratio = spec_size // mel_bins
    target_t = spec_size * ratio
    if x.shape[2] < target_t:
        x = F.interpolate(x, (target_t, x.shape[3]), mode="bicubic", align_corners=True)
    b, c, t, f = x.shape
    x = x.permute(0, 1, 3, 2).contiguous().reshape(b, c, f, ratio, t // ratio)
    x = x.permute(0, 1, 3, 2, 4).contiguous().reshape(b, c, ratio * f, t // ratio)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = _layer_norm(x.flatten(2).transpose(1, 2), sd, "patch_embed.norm")
    h = spec_size // patch
    stage = 0
    while f"layers.{stage}.blocks.0.norm1.weight" in sd:
        heads = sd[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"].shape[1]
        ws = min(window, h)
        block = 0
        while f"layers.{stage}.blocks.{block}.norm1.weight" in sd:
            shift = 0 if (block % 2 == 0 or h <= window) else ws // 2
            x = _block(x, sd, f"layers.{stage}.blocks.{block}.", h, ws, shift, heads)
            block += 1
        if f"layers.{stage}.downsample.reduction.weight" in sd:
            bb, _, cc = x.shape
            g = x.view(bb, h, h, cc)
            x = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1).view(bb, -1, 4 * cc)
            x = F.linear(_layer_norm(x, sd, f"layers.{stage}.downsample.norm"), sd[f"layers.{stage}.downsample.reduction.weight"])
            h //= 2
        stage += 1
    x = _layer_norm(x, sd, "norm")
    b, n, c = x.shape
    if "tscam_conv.weight" not in sd:
        latent = x.mean(1)
        return {"clip_logits": F.linear(latent, sd["head.weight"], sd["head.bias"]), "latent_output": latent}
    sf = st = int(math.sqrt(n))
    x = x.permute(0, 2, 1).contiguous().reshape(b, c, sf, st)
    c_freq_bin = sf // ratio
    x = x.reshape(b, c, sf // c_freq_bin, c_freq_bin, st).permute(0, 1, 3, 2, 4).contiguous().reshape(b, c, c_freq_bin, -1)
    latent = torch.flatten(x, 2).mean(2)
    x = F.conv2d(x, sd["tscam_conv.weight"], sd["tscam_conv.bias"], padding=(0, 1)).flatten(2)  # (B, K, steps)
    framewise = torch.sigmoid(x).permute(0, 2, 1).repeat_interleave(target_t // x.shape[2], dim=1)
    clip_logits = x.mean(2)
    return {"clip_logits": clip_logits, "framewise_output": framewise, "latent_output": latent}
