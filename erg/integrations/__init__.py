"""ERG on third-party models: the seam of `erg.attention` reached through their public extension points.

- `erg.integrations.sd3`: Stable Diffusion 3 (diffusers' `StableDiffusion3Pipeline`), the paper's appendix E.

These modules import their library (diffusers) only where a pipeline is loaded, so `erg` itself keeps
importing torch only.
"""
