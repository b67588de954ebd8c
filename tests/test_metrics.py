"""Metrics, with expected values computed by hand (the arithmetic is in the comments)."""

import pytest

from langmerge.evaluate.metrics import (
    accuracy,
    exact_match,
    label_scores,
    macro_f1,
    parse_label,
    rouge,
    token_f1,
    words,
)

# --- words: one tokenisation for every script --------------------------------------------------


def test_words_folds_case_and_compatibility_forms_and_drops_punctuation():
    assert words("Die Straße ist GROSS.") == ["die", "strasse", "ist", "gross"]
    assert words("Ｈｅｌｌｏ, world! ４２") == ["hello", "world", "42"]  # full width -> ASCII
    assert words("snake_case, e-mail") == ["snake", "case", "e", "mail"]


def test_words_splits_cjk_kana_and_hangul_by_character():
    assert words("我喜欢猫。") == ["我", "喜", "欢", "猫"]
    assert words("私はコーヒーが好き") == ["私", "は", "コ", "ー", "ヒ", "ー", "が", "好", "き"]
    assert words("안녕 world") == ["안", "녕", "world"]


def test_words_keeps_combining_marks_inside_words():
    # Python's \w+ would cut "नमस्ते" at its vowel signs and virama
    assert words("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    assert words("Кошка сидит") == ["кошка", "сидит"]


# --- ROUGE ---------------------------------------------------------------------------------------


def test_rouge_english_averages_f1_over_examples():
    predictions = ["The cat sat on the mat.", "the cat sat"]
    references = ["on the mat the cat sat", "the cat sat on the mat"]
    # 1: same 6 unigrams -> R1 = 1; bigrams on-the, the-mat, the-cat, cat-sat of 5 each
    #    -> R2 = 4/5; LCS "the cat sat" = 3 of 6 each -> RL = 3/6 = 1/2
    # 2: 3 of 3 predicted, 3 of 6 reference unigrams -> R1 = 2*3/(3+6) = 2/3;
    #    bigrams 2 of 2 and 2 of 5 -> R2 = 2*2/(2+5) = 4/7; LCS 3 -> RL = 2/3
    scores = rouge(predictions, references)
    assert scores["rouge1"] == pytest.approx((1 + 2 / 3) / 2)  # 5/6
    assert scores["rouge2"] == pytest.approx((4 / 5 + 4 / 7) / 2)  # 24/35
    assert scores["rougeL"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # 7/12


def test_rouge_chinese_scores_characters():
    # 我 喜 欢 猫 vs 我 喜 欢 狗: 3 of 4 characters -> R1 = 3/4;
    # bigrams 我喜, 喜欢 of 3 -> R2 = 2/3; LCS 我喜欢 = 3 -> RL = 3/4
    assert rouge(["我喜欢狗"], ["我喜欢猫"]) == pytest.approx(
        {"rouge1": 3 / 4, "rouge2": 2 / 3, "rougeL": 3 / 4}
    )


def test_rouge_japanese_mixes_kanji_hiragana_and_katakana():
    # reference 私 は コ ー ヒ ー が 好 き で す (11), prediction 私 は 紅 茶 が 好 き で す (9)
    # common 私 は が 好 き で す = 7 -> R1 = 2*7/(9+11) = 7/10; LCS is the same 7 -> RL = 7/10
    # bigrams 私は, が好, 好き, きで, です = 5 of 8 and 10 -> R2 = 2*5/(8+10) = 5/9
    assert rouge(["私は紅茶が好きです"], ["私はコーヒーが好きです"]) == pytest.approx(
        {"rouge1": 7 / 10, "rouge2": 5 / 9, "rougeL": 7 / 10}
    )


def test_rouge_russian_and_german_letters_count():
    # кошка на ковре common, 3 of 4 -> R1 = RL = 3/4; bigram на-ковре 1 of 3 -> R2 = 1/3
    assert rouge(["Кошка спит на ковре"], ["Кошка сидит на ковре"]) == pytest.approx(
        {"rouge1": 3 / 4, "rouge2": 1 / 3, "rougeL": 3 / 4}
    )
    # casefold: Straße = STRASSE
    assert rouge(["die STRASSE ist groß"], ["Die Straße ist groß"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )


def test_rouge_edge_cases_follow_rouge_score():
    zero = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge([""], [""]) == zero  # no tokens on either side: 0, even when both are empty
    assert rouge(["cat"], ["..."]) == zero
    assert rouge(["cat"], ["Cat!"]) == {"rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0}  # no bigram
    assert rouge([], []) == zero
    with pytest.raises(ValueError):
        rouge(["a", "b"], ["a"])


# --- exact match and token F1 --------------------------------------------------------------------


def test_exact_match_compares_numbers_by_value_and_ignores_punctuation():
    predictions = ["42", " 42.0 ", "The answer: PARIS!", "1,000", "Ｐａｒｉｓ", "3,5", "-5"]
    references = ["42.0", "42", "the answer paris", "1000", "paris", "3.5", "5"]
    # equal: 42 = 42.0, 42.0 = 42, punctuation and case, 1,000 = 1000, full width;
    # "3,5" is the tokens 3 and 5 (not 3.5) and -5 != 5 -> 5 of 7
    assert exact_match(predictions, references) == pytest.approx(5 / 7)
    assert exact_match(["我 喜欢猫。"], ["我喜欢猫"]) == 1.0  # CJK compares by character


def test_token_f1_partial_overlap():
    # 1: the cat sat on the mat / a cat sat on a mat: cat sat on mat = 4 of 6 and 6 -> 8/12 = 2/3
    # 2: "in paris" / "paris france": paris = 1 of 2 and 2 -> 2*1/(2+2) = 1/2
    predictions = ["The cat sat on the mat", "in Paris"]
    references = ["a cat sat on a mat", "Paris, France"]
    assert token_f1(predictions, references) == pytest.approx((2 / 3 + 1 / 2) / 2)  # 7/12
    assert token_f1(["我喜欢狗"], ["我喜欢猫"]) == pytest.approx(3 / 4)  # 2*3/(4+4)
    assert token_f1(["", "cat"], ["!", ""]) == 0.5  # both without tokens: 1; one side only: 0


# --- classification ------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_with_a_class_missing_from_predictions():
    gold, predicted = ["a", "a", "b", "c"], ["a", "a", "b", "b"]
    assert accuracy(gold, predicted) == 3 / 4
    # a: 2 tp -> 1; b: 1 tp, 1 fp -> 2/(2+1) = 2/3; c: no tp -> 0; mean (1 + 2/3 + 0)/3 = 5/9
    assert macro_f1(gold, predicted) == pytest.approx(5 / 9)


def test_macro_f1_with_a_predicted_class_missing_from_gold():
    # a: 1; b: 2 tp, 1 fn -> 4/(4+1) = 4/5; c (only predicted): 1 fp -> 0; mean 1.8/3 = 3/5
    assert macro_f1(["a", "b", "b", "b"], ["a", "b", "b", "c"]) == pytest.approx(3 / 5)


def test_parse_label_prefers_longer_labels_and_whole_words():
    labels = ["positive", "very positive", "negative"]
    assert parse_label("Very positive!", labels) == "very positive"
    assert parse_label("positive", labels) == "positive"
    assert parse_label("Positive, I think.", labels) == "positive"
    assert parse_label("The sentiment is very positive.", labels) == "very positive"
    assert parse_label("positively", labels) is None  # not the whole word
    assert parse_label("It is positive, not negative", labels) is None  # two labels
    assert parse_label("I don't know", labels) is None


def test_parse_label_numeric_and_chinese_labels():
    stars = ["0", "1", "2", "3", "4"]
    assert parse_label("3", stars) == "3"
    assert parse_label("3 stars", stars) == "3"
    assert parse_label("Answer: 3", stars) == "3"
    assert parse_label("3.0", stars) == "3"
    assert parse_label("3.5", stars) is None
    assert parse_label("between 2 and 3", stars) is None
    assert parse_label("这条评论是积极的。", ["积极", "消极"]) == "积极"


def test_label_scores_count_unparseable_generations_as_wrong():
    labels = ["positive", "negative"]
    gold = ["positive", "negative", "positive", "negative"]
    generated = ["Positive.", "negative", "I cannot tell", "positive"]
    # parsed: positive, negative, None, positive -> 2 of 4 right
    # positive: 1 tp, 1 fp, 1 fn (the unparseable one) -> 2/(2+1+1) = 1/2
    # negative: 1 tp, 1 fn -> 2/(2+1) = 2/3; no class for None: mean (1/2 + 2/3)/2 = 7/12
    assert label_scores(generated, gold, labels) == pytest.approx(
        {"accuracy": 1 / 2, "macro_f1": 7 / 12, "unparseable": 1 / 4}
    )
    with pytest.raises(ValueError, match="not among the labels"):
        label_scores(["positive"], ["neutral"], labels)
    with pytest.raises(ValueError):
        label_scores(["positive"], [], labels)


def test_thai_and_khmer_are_scored_by_letter_clusters():
    # ฉั น รั ก แ ม ว against ฉั น รั ก ห ม า: 5 of 7 clusters shared → R1 = RL = 5/7;
    # bigrams ฉัน, นรั, รัก shared of 6 → R2 = 3/6
    scores = rouge(["ฉันรักแมว"], ["ฉันรักหมา"])
    assert scores == {"rouge1": 5 / 7, "rouge2": 0.5, "rougeL": 5 / 7}
    assert words("ខ្ញុំស្រឡាញ់ឆ្មា") == ["ខ្", "ញុំ", "ស្", "រ", "ឡា", "ញ់", "ឆ្", "មា"]
