"""What runs a pipeline and knows no model family: the denoising loop with its request and
batch types (``loop``), step-level batching across requests (``stepping``), streamed
weight loading (``loading``), component and layerwise offload (``offload``), LoRA adapter
tables (``lora``) and adapter files (``lora_files``), step checkpoints and resume
(``checkpoint``), decode progress and preview steps (``progress``), ``torch.compile`` of
the repeated blocks (``compiled``), applying a declared parallel layout (``parallelize``)
and the returning rank's decisions agreed by the replica (``agree``).

Below ``models`` and ``engine``, above ``parallel``: ``models -> runtime -> parallel``;
nothing here imports a model family, the engine or the server.
"""
