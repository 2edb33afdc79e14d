"""The slice autoencoder adapter over diffusers.AutoencoderKL."""

import pytest
import torch
from diffusers import AutoencoderKL

from ctflow.autoencoder import VAE_PRESETS, SliceAutoencoder
from ctflow.config import AutoencoderConfig
from ctflow.errors import CorruptModelError
from ctflow.model_folder import load_vae


def tiny(chunk_size=16, image_size=16):
    torch.manual_seed(0)
    return SliceAutoencoder(AutoencoderKL(**VAE_PRESETS["tiny"]), AutoencoderConfig(image_size=image_size, chunk_size=chunk_size))


def test_hu_window_maps_to_model_range_and_back():
    ae = tiny()
    hu = torch.tensor([-3000.0, -1000.0, 0.0, 1000.0, 3071.0])
    x = ae.hu_to_model(hu)
    assert x.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]  # clipped to [-1000, 1000]
    assert ae.model_to_hu(x).tolist() == [-1000.0, -1000.0, 0.0, 1000.0, 1000.0]


def test_chunked_encode_and_decode_equal_one_pass():
    hu = torch.linspace(-1000, 1000, 5 * 16 * 16).view(5, 16, 16)
    whole, chunked = tiny(chunk_size=16), tiny(chunk_size=1)
    assert (whole.chunk_size, chunked.chunk_size) == (2, 1)  # on a CPU at most CPU_CHUNK slices per call
    latents = whole.encode(hu)
    assert latents.shape == (5, 4, 8, 8)
    assert torch.allclose(latents, chunked.encode(hu), atol=1e-5)
    decoded = whole.decode(latents)
    assert decoded.shape == (5, 16, 16)
    assert torch.allclose(decoded, chunked.decode(latents), atol=0.05)  # HU
    assert decoded.min() >= -1000 and decoded.max() <= 1000


def test_constant_latents_are_cached_and_distinct():
    ae = tiny()
    black, white = ae.constant_latent(-1000.0), ae.constant_latent(1000.0)
    assert black.shape == (4, 8, 8)
    assert ae.constant_latent(-1000.0) is black
    assert not torch.allclose(black, white)


def test_a_flux_vae_folder_loads_unchanged(tmp_path):
    """FLUX.1's vae/ folder (3-channel input, 16 latents, scaling 0.3611, shift 0.1159) works as saved by diffusers."""
    torch.manual_seed(0)
    AutoencoderKL(**VAE_PRESETS["flux"]).save_pretrained(tmp_path / "vae", safe_serialization=True)
    ae = SliceAutoencoder(load_vae(tmp_path), AutoencoderConfig(image_size=32))
    assert (ae.scaling, ae.shift, ae.latent_channels, ae.downsample, ae.latent_size) == (0.3611, 0.1159, 16, 8, 4)
    hu = torch.full((2, 32, 32), -200.0)
    raw = ae.vae.encode(ae.hu_to_model(hu)[:, None].expand(-1, 3, -1, -1)).latent_dist.mode()
    assert torch.allclose(ae.encode(hu), (raw - 0.1159) * 0.3611, atol=1e-5)
    assert ae.decode(ae.encode(hu)).shape == (2, 32, 32)


def test_a_model_folder_without_its_autoencoder_says_so_in_one_line(tmp_path):
    """Not diffusers' advice to check the internet connection: the folder is local and never a hub id."""
    (tmp_path / "empty" / "vae").mkdir(parents=True)
    for folder in (tmp_path / "none", tmp_path / "empty"):
        with pytest.raises(CorruptModelError) as caught:
            load_vae(folder)
        assert str(caught.value) == f"cannot load the slice autoencoder from {folder / 'vae'}: it holds no config.json"
