"""The pipelines that ship with dicomnode."""

from dicomnode.pipelines import PipelineSpec, register

register(
    PipelineSpec(
        name="ct-tissue",
        version="1.0.0",
        entry_point="dicomnode.pipelines.ct_tissue:run",
        modalities=("CT",),
        description="Weight-free CT tissue and district segmentation (HU thresholds, morphology)",
    )
)

register(
    PipelineSpec(
        name="ct-sr",
        version="1.0.0",
        entry_point="dicomnode.pipelines.ct_sr:run",
        modalities=("CT",),
        description="SR4ZCT through-plane super-resolution, self-supervised per series",
    )
)

register(
    PipelineSpec(
        name="ct-organs",
        version="1.0.0",
        entry_point="dicomnode.pipelines.ct_organs:run",
        modalities=("CT",),
        description="A segmentation model from models/ (MONAI bundle or manifest) -> SEG",
    )
)

register(
    PipelineSpec(
        name="pet-denoise",
        version="1.0.0",
        entry_point="dicomnode.pipelines.pet_denoise:run",
        modalities=("PT",),
        description="Low-dose PET enhancement with DRMC -> derived PET (units and SUV kept)",
    )
)

register(
    PipelineSpec(
        name="ct2pet",
        version="1.0.0",
        entry_point="dicomnode.pipelines.ct2pet:run",
        modalities=("CT",),
        description="District-specific 3-D Pix2Pix CT -> synthetic PET (SUV), labelled synthetic",
    )
)
