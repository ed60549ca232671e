import random

from ppo_lm import demo, toy


def test_demo_corpus_and_prompts_use_only_known_words():
    tok = toy.word_tokenizer(demo.vocabulary())
    rng = random.Random(0)
    texts = [demo.review(rng) for _ in range(300)] + demo.PROMPTS + demo.HELDOUT_PROMPTS
    assert all(tok.unk_token_id not in tok(t)["input_ids"] for t in texts)
    assert not set(demo.HELDOUT_PROMPTS) & set(demo.PROMPTS)  # evaluation openings are held out


def test_demo_corpus_is_balanced_in_sentiment():
    from ppo_lm.rewards.builtin import Sentiment

    rng = random.Random(1)
    scores = Sentiment()([], [demo.review(rng) for _ in range(400)], {})
    assert abs(scores.mean().item()) < 0.15  # the pre-trained model starts neutral on average
    assert (scores > 0.5).float().mean() > 0.3 and (scores < -0.5).float().mean() > 0.3
