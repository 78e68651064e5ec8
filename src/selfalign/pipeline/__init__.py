"""The ImageNet-scale pipeline: latent caching with a VAE (``prepare``), the VAE itself (``vae``),
the shard format (``shards``), image sources (``sources``) and released-checkpoint conversion
(``convert``). Nothing here is imported by ``import selfalign``; diffusers only when a VAE loads."""
