"""The network and its process: the DiT backbone (`dit`), ADM's Gaussian diffusion (`diffusion`), its
forward-pass Gflops (`flops`) and its weights on disk (`checkpoint`). The named shapes live in
`harness.config.registry`, importable without torch."""
