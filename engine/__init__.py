"""AuraFlow Edge runtime. Data flow, by subpackage:

model/     checkpoint (diffusers folder, single file, hub id) -> config + streamed weights, LoRA
runtime/   pipeline: tokenize -> text encoder -> Euler/CFG sampler over the transformer -> VAE decode,
           one stage resident at a time (planner, manifest of engine folders, modulation tables)
backends/  the stages on torch, ONNX Runtime or TensorRT
cli/       `auraflow-edge` (the only place allowed to import export/)
tiny/      small local models for the demo, tests and benchmarks
"""
