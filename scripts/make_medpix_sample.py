"""Build the MedPix-schema sample shipped in plugin/torchtune_mistral3/assets/medpix_sample/.

Images: real DICOM test images (NEMA WG04 sample sets and other anonymised test data) from the MIT-licensed
``pydicom`` and ``pydicom-data`` packages, converted to PNG: 16-bit grayscale where the source is more than 8 bits
(with the display window, when one is used, in PNG text chunks ``WindowCenter``/``WindowWidth``), 8-bit grayscale,
RGB or palette otherwise; large images are downscaled. Questions and answers were written by looking at each image
and its DICOM header. The split puts whole cases in train or validation with
``torchtune_mistral3.datasets.validation_cases`` (val_fraction 0.25, seed 0).

    pip install pydicom==3.0.2 pydicom-data==1.0.0
    PYTHONPATH=plugin python scripts/make_medpix_sample.py [--out plugin/torchtune_mistral3/assets/medpix_sample]

The output is byte-for-byte reproducible for the same package versions.
"""

import argparse
import io
from pathlib import Path

import numpy as np
import pydicom
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut
from torchtune_mistral3.datasets import validation_cases

MAX_EDGE = 512
VAL_FRACTION, SPLIT_SEED = 0.25, 0

# case_id (the DICOM file it comes from), mode (DICOM modality), how it is stored, questions and answers.
CASES = [
    {
        "file": "CT_small.dcm", "mode": "CT", "store": "u16",
        "qa": [
            ("What imaging modality and plane is shown?",
             "This is an axial (transverse) CT image through the chest."),
            ("Which bony structure lies in the middle of the image?",
             "A thoracic vertebra: the vertebral body in front, the spinal canal behind it, and the posterior "
             "elements with the spinous process pointing backwards."),
            ("What is the round soft-tissue structure in front of and to the left of the vertebral body?",
             "It is the descending thoracic aorta."),
        ],
    },
    {
        "file": "explicit_VR-UN.dcm", "mode": "CT", "store": "u16", "offset": 1024, "window": (40 + 1024, 400),
        "flip_vertical": True,
        "qa": [
            ("What imaging modality and plane is shown?",
             "An axial CT image of the upper abdomen."),
            ("Which paired organs are seen on either side of the spine?",
             "Both kidneys are seen on either side of the vertebral body."),
            ("What are the black areas in the front of the abdomen, near the top of the image?",
             "They are gas within loops of bowel."),
        ],
    },
    {
        "file": "MR_small.dcm", "mode": "MR", "store": "u16", "window": (600, 1600),
        "qa": [
            ("What imaging modality produced this image?",
             "Magnetic resonance imaging (MRI)."),
            ("How large is the field of view of this image?",
             "About 2 cm across: 64 by 64 pixels of 0.31 mm each, a small crop of an MR image."),
        ],
    },
    {
        "file": "examples_overlay.dcm", "mode": "MR", "store": "u16", "window": (450, 790),
        "qa": [
            ("What kind of image is this?",
             "An axial T1-weighted, fat-suppressed MR image of the upper abdomen taken after intravenous "
             "gadolinium contrast."),
            ("Where is the abnormality?",
             "There is a rounded lesion with a rim in the right lobe of the liver, on the left side of the image."),
            ("Why do the kidneys appear so bright?",
             "The kidneys enhance strongly after contrast injection, so they are bright on this post-contrast "
             "T1-weighted image."),
        ],
    },
    {
        "file": "MR2_UNCI.dcm", "mode": "MR", "store": "l8",
        "qa": [
            ("Which joint is shown?",
             "The shoulder (glenohumeral joint)."),
            ("In which plane was this image acquired?",
             "In an oblique coronal plane, along the supraspinatus."),
            ("What is the large rounded bone in the lower left part of the image?",
             "The humeral head, the upper end of the humerus, which articulates with the glenoid of the scapula."),
        ],
    },
    {
        "file": "emri_small.dcm", "frame": 0, "mode": "MR", "store": "u16",
        "qa": [
            ("Which part of the body was examined?",
             "The head; this is one frame of a T1-weighted MR series of the head."),
            ("How many frames does the series contain, and what is the size of each?",
             "The series has 10 frames of 64 by 64 pixels."),
        ],
    },
    {
        "file": "RG1_UNCI.dcm", "mode": "CR", "store": "l8", "invert": True,
        "qa": [
            ("What type of radiograph is this?",
             "A posteroanterior (PA) chest radiograph."),
            ("What abnormality is seen in the lungs?",
             "Multiple rounded nodular opacities of different sizes are scattered through both lungs."),
            ("What is the most likely diagnosis for this pattern?",
             "Multiple pulmonary metastases (a 'cannonball' pattern), although other causes of multiple lung "
             "nodules have to be considered."),
        ],
    },
    {
        "file": "RG3_UNCI.dcm", "mode": "CR", "store": "u16", "invert": True,
        "qa": [
            ("Which bones are shown?",
             "The tibia and fibula of the lower leg, down to the ankle joint."),
            ("Which side was imaged?",
             "The right side, as the R marker on the radiograph and the image header show."),
            ("Describe the lesion in the distal tibia.",
             "A well-defined, lobulated lucent lesion with a thin sclerotic margin in the distal tibial metaphysis, "
             "typical of a non-ossifying fibroma."),
        ],
    },
    {
        "file": "JPEG2000.dcm", "mode": "NM", "store": "l8",
        "qa": [
            ("What kind of study is this?",
             "A whole-body nuclear medicine bone scan (skeletal scintigraphy)."),
            ("What is the intense focus of activity in the pelvis?",
             "The urinary bladder, which collects the tracer excreted by the kidneys."),
            ("How much of the body is covered?",
             "The whole body, from the skull down to the feet."),
        ],
    },
    {
        "file": "examples_rgb_color.dcm", "mode": "US", "store": "rgb",
        "qa": [
            ("What imaging technique is shown?",
             "Ultrasound with power Doppler, shown in colour over the grayscale image."),
            ("Which structure is being examined?",
             "A lymph node, as labelled under the image."),
            ("What does the colour signal inside the structure indicate?",
             "Blood flow: the lymph node has prominent internal vascularity."),
        ],
    },
    {
        "file": "OBXXXX1A.dcm", "mode": "US", "store": "palette",
        "qa": [
            ("What kind of ultrasound examination is this?",
             "An obstetric (OB) ultrasound examination with a curved-array transducer at 11 cm depth."),
            ("What do the two small crosses joined by a dotted line show?",
             "A caliper distance measurement, reported as 1.06 cm at the top of the image."),
        ],
    },
    {
        "file": "color3d_jpeg_baseline.dcm", "frame": 60, "mode": "US", "store": "rgb",
        "qa": [
            ("What examination is this?",
             "A transthoracic echocardiogram: an ultrasound of the heart with a cardiac preset."),
            ("Why is the image fan-shaped?",
             "A phased-array (sector) probe was used, which gives a sector-shaped field of view."),
            ("Is this a single still image?",
             "No, it is one frame of a 120-frame cine loop of the beating heart."),
        ],
    },
]


def _downscale(pixels: np.ndarray) -> np.ndarray:
    """Shrink so the longest edge is at most MAX_EDGE (Lanczos, in float to keep 16-bit precision)."""
    h, w = pixels.shape[:2]
    scale = MAX_EDGE / max(h, w)
    if scale >= 1:
        return pixels
    size = (round(w * scale), round(h * scale))
    if pixels.ndim == 3:
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
    out = np.asarray(Image.fromarray(pixels.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))
    return np.clip(np.rint(out), 0, np.iinfo(pixels.dtype).max).astype(pixels.dtype)


def _png(case: dict) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(case["file"]))
    pixels = ds.pixel_array
    if "frame" in case:
        pixels = pixels[case["frame"]]
    info = PngImagePlugin.PngInfo()
    store = case["store"]
    if store == "palette":
        # Keep the indices and turn the DICOM palette LUT into a PNG palette (8 bits per entry).
        lut = apply_color_lut(np.arange(256, dtype=np.uint8), ds).astype(np.float64)
        lut = np.rint(lut / lut.max() * 255).astype(np.uint8)
        image = Image.frombytes("P", pixels.shape[::-1], pixels.astype(np.uint8).tobytes())
        image.putpalette(lut.reshape(-1).tolist())
    elif store == "rgb":
        image = Image.fromarray(_downscale(pixels.astype(np.uint8)))
    else:
        values = pixels.astype(np.int64) + case.get("offset", 0)
        if case.get("invert"):  # MONOCHROME1: high values are dark
            values = values.max() - values
        if case.get("flip_vertical"):  # rows run posterior -> anterior in this file; show anterior at the top
            values = values[::-1]
        if store == "u16":
            image = Image.fromarray(_downscale(np.clip(values, 0, 65535).astype(np.uint16)))
            if "window" in case:
                info.add_text("WindowCenter", str(case["window"][0]))
                info.add_text("WindowWidth", str(case["window"][1]))
        else:  # 8-bit grayscale, windowed to the 0.5th..99.5th percentile
            lo, hi = np.percentile(values, [0.5, 99.5])
            gray = np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
            image = Image.fromarray(_downscale(gray))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, optimize=True)
    return buffer.getvalue()


def main() -> None:
    """Write train.parquet and validation.parquet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "plugin/torchtune_mistral3/assets/medpix_sample"
    parser.add_argument("--out", type=Path, default=default_out)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in CASES:
        png, case_id = _png(case), Path(case["file"]).stem
        for question, answer in case["qa"]:
            rows.append({"image_id": {"bytes": png, "path": None}, "mode": case["mode"], "case_id": case_id,
                         "question": question, "answer": answer})
    val = validation_cases([r["case_id"] for r in rows], VAL_FRACTION, SPLIT_SEED)
    features = Features({"image_id": ImageFeature(), "mode": Value("string"), "case_id": Value("string"),
                         "question": Value("string"), "answer": Value("string")})
    for split, in_val in (("train", False), ("validation", True)):
        part = [r for r in rows if (r["case_id"] in val) == in_val]
        columns = {k: [r[k] for r in part] for k in features}
        Dataset.from_dict(columns, features=features).to_parquet(out / f"{split}.parquet")
        cases = sorted({r["case_id"] for r in part})
        print(f"{split}: {len(part)} rows, {len(cases)} cases: {', '.join(cases)}")


if __name__ == "__main__":
    main()
