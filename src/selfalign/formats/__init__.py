"""On-disk formats: checkpoint directories, latent shards, and the fault points that test their
crash safety. They read and write tensors and plain data only; building models from them happens
above (:mod:`selfalign.runs`)."""
