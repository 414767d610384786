"""The pipelines that ship with dicomnode.

Each one's ``series_number`` is fixed (results: SeriesNumber 9000 + it by default): a plugin
cannot renumber them. Pipelines that need torch/MONAI say so in ``requires`` (the ``ml`` extra).
"""

from dicomnode.pipelines import PipelineSpec, register

register(
    PipelineSpec(
        name="ct-tissue",
        version="1.0.0",
        entry_point="dicomnode.pipelines.ct_tissue:run",
        modalities=("CT",),
        description="Weight-free CT tissue and district segmentation (HU thresholds, morphology)",
        series_number=2,
    )
)

register(
    PipelineSpec(
        name="ct-sr",
        version="1.1.0",
        entry_point="dicomnode.pipelines.ct_sr:run",
        modalities=("CT",),
        description="SR4ZCT through-plane super-resolution, self-supervised per series",
        series_number=1,
        requires=("torch",),
    )
)

register(
    PipelineSpec(
        name="ct-organs",
        version="1.0.0",
        entry_point="dicomnode.pipelines.ct_organs:run",
        modalities=("CT",),
        description="A segmentation model from models/ (MONAI bundle or manifest) -> SEG",
        series_number=0,
        requires=("torch", "monai"),
    )
)

register(
    PipelineSpec(
        name="pet-denoise",
        version="1.0.0",
        entry_point="dicomnode.pipelines.pet_denoise:run",
        modalities=("PT",),
        description="Low-dose PET enhancement with DRMC -> derived PET (units and SUV kept)",
        series_number=4,
        requires=("torch", "monai"),
    )
)

register(
    PipelineSpec(
        name="ct2pet",
        version="1.1.0",
        entry_point="dicomnode.pipelines.ct2pet:run",
        modalities=("CT",),
        description="District-specific 3-D Pix2Pix CT -> synthetic PET (SUV), labelled synthetic",
        series_number=3,
        requires=("torch",),
    )
)

# study pipelines: a rule with requires: {CT: ..., PET: ...} (one job per PET/CT study)
register(
    PipelineSpec(
        name="petct-suv25",
        version="1.0.0",
        entry_point="dicomnode.pipelines.petct_lesions:run_suv25",
        modalities=("CT", "PT"),
        description="FDG PET/CT lesions at SUVbw >= 2.5 (threshold baseline) -> SEG + TID 1500 SR",
        series_number=5,
        roles=("CT", "PET"),
    )
)

register(
    PipelineSpec(
        name="petct-suv41",
        version="1.0.0",
        entry_point="dicomnode.pipelines.petct_lesions:run_suv41",
        modalities=("CT", "PT"),
        description="FDG PET/CT lesions at 41 % of SUVmax (threshold baseline) -> SEG + TID 1500 SR",
        series_number=6,
        roles=("CT", "PET"),
    )
)

register(
    PipelineSpec(
        name="petct-percist",
        version="1.0.0",
        entry_point="dicomnode.pipelines.percist:run_percist",
        modalities=("CT", "PT"),
        description="FDG PET/CT lesions above a PERCIST-style liver reference (1.5 x liver "
                    "SUVmean + 2 SD; threshold baseline) -> SEG + TID 1500 SR",
        series_number=8,
        roles=("CT", "PET"),
    )
)

register(
    PipelineSpec(
        name="petct-lesions",
        version="1.0.0",
        entry_point="dicomnode.pipelines.petct_lesions:run_network",
        modalities=("CT", "PT"),
        description="FDG PET/CT lesions by a middle-fusion U-Net -> SEG + TID 1500 SR",
        series_number=7,
        requires=("torch", "monai"),
        roles=("CT", "PET"),
    )
)
