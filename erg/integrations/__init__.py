"""ERG on third-party models: the seam of `erg.attention` reached through their public extension points.

- `erg.integrations.adapter`: the shared layer for any diffusers transformer (denoiser adapter in our t /
  velocity conventions, attention processors through the seam installed only for a planned forward,
  C-ERG on the pipeline's text encoders, the pipeline's own time grid, offline loading, CPU offload);
  its module docstring says what a family file provides.
- `erg.integrations.sd3`: Stable Diffusion 3 (diffusers' `StableDiffusion3Pipeline`), the paper's appendix E.
- `erg.integrations.sd35`: Stable Diffusion 3.5 large / medium (the same pipeline; medium's extra image
  self-attention in its first blocks routed as part of its block's layer).
- `erg.integrations.flux`: Flux.1-dev / -schnell (`FluxPipeline`), double- and single-stream blocks, dev's
  distilled guidance embedding beside a true CFG branch.
- `erg.integrations.pixart`: PixArt-Sigma (`PixArtSigmaPipeline`), a DDPM model mapped to our flow time.
- `erg.integrations.wan`: Wan 2.1 / 2.2 text-to-video (`WanPipeline`), a (frames, h, w) token grid.

These modules import their library (diffusers) only where a pipeline is loaded, so `erg` itself keeps
importing torch only.
"""
