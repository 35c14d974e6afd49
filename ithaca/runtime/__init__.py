"""What runs a pipeline and knows no model family: streamed weight loading (``loading``),
component and layerwise offload (``offload``), LoRA adapter tables (``lora``), step
checkpoints (``checkpoint``), decode progress (``progress``) and ``torch.compile`` of the
repeated blocks (``compiled``).

Below ``models`` and ``engine``, above ``parallel``: ``models -> runtime -> parallel``;
nothing here imports a model family, the engine or the server.
"""
