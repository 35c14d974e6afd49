"""What runs a pipeline and knows no model family: streamed weight loading (``loading``),
component and layerwise offload (``offload``), LoRA adapter tables (``lora``), step
checkpoints and resume (``checkpoint``), decode progress and preview steps
(``progress``), ``torch.compile`` of the repeated blocks (``compiled``), applying a
declared parallel layout (``parallelize``), the returning rank's decisions agreed by the
replica (``agree``) and step-level batching across requests (``stepping``).

Below ``models`` and ``engine``, above ``parallel``: ``models -> runtime -> parallel``;
nothing here imports a model family, the engine or the server.
"""
