"""ARMT (associative recurrent memory transformer): layer-level associative memory on HF decoders.

* :mod:`.memory`: the memory math (read, write, the state);
* :mod:`.base`: what both wrappers share (constructor, checks, checkpoints);
* :mod:`.state_dict`: the published wrapper's state dict (its two names of each wrapped layer) sorted into ours;
* :mod:`.hooks`: the memory on transformers' layers through forward hooks (reference, generate);
* :mod:`.reference`: ReferenceARMT, the plain faithful baseline;
* :mod:`.layers`: the decoder layers of GPT-2 and the Llama family as batched math over stacked weights;
* :mod:`.plan`: one call's segment inputs, positions and attention layouts;
* :mod:`.schedule`: the sequential and the anti-diagonal orders of (segment, layer) cells;
* :mod:`.fast`: FastARMT.
"""
