"""Architecture families beyond the standard YOLOv5 blocks, one self-contained file per family.

Contract every family file follows (``models/yolo.py`` relies on it):

- The file's docstring cites the paper; it imports only torch, timm, ``models.common``
  (for the shared folding primitives ``ConvBN``, ``fold_bn``, ``pad_kernel``, ``identity_kernel``,
  ``bn_as_conv``, ``make_conv`` and the protocol below) and ``models.pretrained`` (checkpoint formats).
- Published checkpoints: a family whose official code publishes weights declares
  ``CHECKPOINT_FORMATS: tuple[models.pretrained.CheckpointFormat, ...]``: how to recognise the official
  state_dict, which keys are classifier heads, and where each official tensor goes in a model's rows.
  ``models.pretrained.load_backbone_weights`` (``train.py --backbone-weights``) finds them all.
- Re-parameterization: a module that trains with branches (or conv + BatchNorm) subclasses
  ``models.common.Reparameterizable`` and implements ``_fold()``. That gives it ``reparameterize()``
  (timm's name; in place, idempotent, children included; the eval-mode output is unchanged) and the
  ``folded`` property (no BatchNorm, hence no training branch, left). A module equal to one
  convolution also implements ``folded_kernel_bias()``, that convolution's kernel and bias, valid
  before and after folding. ``model.fuse()`` walks the module tree parent first and calls
  ``reparameterize()`` on every module that has it.
- Variants: a family with named sizes declares ``VARIANTS: dict[str, dict]`` (variant name -> constructor
  keyword arguments) and registers one YAML constructor per variant, ``<family>_<variant>(c1=3, **overrides)``,
  made by ``models.common.variant_constructors``; ``<family>`` is the file's name unless the file declares
  ``VARIANT_PREFIX`` (repghost.py: ``repghostnet``, the published network's name).
- ``YAML_MODULES: dict[str, tuple[callable, str]]`` maps each name usable in a model YAML to its
  constructor and its argument convention (``kind``) for a row ``[from, n, name, args]``:

  ``conv``      args ``[c2, *rest]``; c2 scaled by width_multiple (multiple of 8); built as
                ``ctor(c1, c2, *rest)``; n > 1 stacks n copies in ``nn.Sequential``.
  ``csp``       as ``conv`` but the depth-scaled repeats go to the constructor: ``ctor(c1, c2, n, *rest)``.
  ``fixed``     ``args[0]`` is the output channel count, used as is; built as ``ctor(*args[1:])``.
  ``backbone``  multi-output: built as ``ctor(c1, *args)``; forward returns a list of feature maps
                whose strides (measured) place them at layer indices 0-4 (P1/2 ... P5/32); the
                constructor's module must be the first row of the YAML.
  ``plain``     built as ``ctor(*args)``; output channels equal input channels.
"""
