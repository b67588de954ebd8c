"""Language codes: a recipe's languages are BCP 47 tags whose language is a real one."""

from __future__ import annotations

import re

TAG = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # BCP 47: en, pt-BR, zh-Hant

# ISO 639-1, and the withdrawn codes some tools still write (iw Hebrew, in Indonesian, ji Yiddish)
_CODES = """
aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da
de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz
ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln
lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi
pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti
tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu iw in ji
"""
ISO_639_1 = frozenset(_CODES.split())

# country codes and other spellings written where a language code belongs
LIKELY = {"jp": "ja", "cn": "zh", "gr": "el", "cz": "cs", "dk": "da", "ua": "uk", "gb": "en",
          "us": "en", "ge": "de or ka", "vn": "vi", "ir": "fa", "il": "he", "rs": "sr",
          "al": "sq"}  # fmt: skip


def problem(code: str) -> str | None:
    """Why `code` is not a language code langmerge accepts, or None. Two-letter languages must
    be ISO 639-1; three-letter ones (ISO 639-2/3, thousands of them) are taken as given."""
    if not TAG.match(code):
        return f"{code!r} is not a BCP 47 language tag such as en, de or pt-BR"
    language = code.split("-")[0]
    if len(language) == 2 and language not in ISO_639_1:
        hint = f": did you mean {LIKELY[language]}?" if language in LIKELY else ""
        return f"{code!r} names no language (ISO 639-1){hint}"
    return None
