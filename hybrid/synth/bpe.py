"""Byte-level BPE training and the tiktoken.model file format, for synthetic checkpoints and tests.

Owns: a small deterministic trainer (splitting text with the tokenizer's own pattern, KIMI_PAT_STR of
hybrid.text.tokenizer), the writer of `base64 rank` lines, and a built-in multilingual sample corpus.
Must not: load tokenizers or know about special tokens (that is hybrid.text.tokenizer); it never touches
the network.
"""

from __future__ import annotations

import base64
import heapq
import logging
import os
from collections import Counter

import regex

from hybrid.text.tokenizer import KIMI_PAT_STR

logger = logging.getLogger(__name__)


def _pair_counts(word: list[int]) -> Counter:
    return Counter(zip(word, word[1:]))


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _fill_ranks(vocab: list[bytes], ids: dict[bytes, int], n_ranks: int) -> None:
    """Corpus exhausted: add concatenations of learned tokens (ascending rank pairs) up to n_ranks."""
    logger.info("BPE corpus exhausted at %d ranks; filling to %d with token concatenations", len(vocab), n_ranks)
    learned = len(vocab)
    for total in range(2 * learned):
        for i in range(max(0, total - learned + 1), min(total + 1, learned)):
            merged = vocab[i] + vocab[total - i]
            if merged not in ids:
                ids[merged] = len(vocab)
                vocab.append(merged)
                if len(vocab) >= n_ranks:
                    return


def train_bpe(corpus: list[str], n_ranks: int, pat_str: str = KIMI_PAT_STR) -> dict[bytes, int]:
    """Learn byte-level BPE ranks as tiktoken uses them.

    Ranks 0..255 are the single bytes (rank == byte value); then merged tokens in learning order until
    there are `n_ranks`. Merges never cross pre-tokenizer pieces. Ties break on the pair's bytes, so the
    result is deterministic. Pairs seen once still merge; when every piece is one token the rest of
    the ranks are filled with concatenations of learned tokens (logged), so any n_ranks works.
    """
    if isinstance(corpus, str):
        corpus = [corpus]
    if n_ranks < 256:
        raise ValueError(f"n_ranks must be >= 256 (the single bytes), got {n_ranks}")
    pattern = regex.compile(pat_str, regex.V1)
    piece_counts: Counter = Counter()
    for text in corpus:
        piece_counts.update(pattern.findall(text))

    vocab: list[bytes] = [bytes([i]) for i in range(256)]  # id == rank
    ids: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, count in sorted(piece_counts.items()):
        word = list(piece.encode("utf-8"))
        if len(word) > 1:
            words.append(word)
            freqs.append(count)

    counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, word in enumerate(words):
        for pair, n in _pair_counts(word).items():
            counts[pair] += n * freqs[w]
            where.setdefault(pair, set()).add(w)
    # max-heap by count, then smallest bytes; stale entries are skipped on pop
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)

    while len(vocab) < n_ranks:
        while heap:
            neg, _, _, a, b = heapq.heappop(heap)
            if counts.get((a, b), 0) == -neg and neg < 0:
                break
        else:
            _fill_ranks(vocab, ids, n_ranks)
            break
        merged = vocab[a] + vocab[b]
        new = ids.get(merged)
        if new is None:  # the same bytes can arise from two different splits; keep one rank
            new = len(vocab)
            vocab.append(merged)
            ids[merged] = new
        changed: set[tuple[int, int]] = set()
        for w in sorted(where.pop((a, b), ())):
            old = words[w]
            for pair, n in _pair_counts(old).items():
                counts[pair] -= n * freqs[w]
                changed.add(pair)
                if pair != (a, b):
                    where[pair].discard(w)
            word = _merge_word(old, a, b, new)
            words[w] = word
            for pair, n in _pair_counts(word).items():
                counts[pair] += n * freqs[w]
                changed.add(pair)
                where.setdefault(pair, set()).add(w)
        for pair in changed:
            c = counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, vocab[pair[0]], vocab[pair[1]], pair[0], pair[1]))
            else:
                del counts[pair]
    logger.debug("trained %d BPE ranks from %d distinct pieces", len(vocab), len(piece_counts))
    return {tok: rank for rank, tok in enumerate(vocab)}


def write_tiktoken_model(path: str | os.PathLike, ranks: dict[bytes, int]) -> None:
    """Write `base64(token) rank` lines in rank order, as tiktoken.load.load_tiktoken_bpe reads them."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.writelines(lines)



# ---- built-in sample corpus: hand-written text plus deterministic generated structure ----

_PROSE_EN = """\
The lighthouse keeper woke before dawn, as he had done for thirty-one years. He climbed the spiral stairs, counted the one hundred and twelve steps out of habit, and checked the lamp. The sea was calm that morning, grey as pewter, and a thin fog lay over the harbour like a sheet left out to dry.
In the village below, the baker was already pulling the first loaves from the oven. She sold bread to fishermen, to children on their way to school, and to the tourists who came in summer and asked for croissants she never made. "We make bread here," she would say, "not pastries for people who sleep late."
Learning a new programming language is a lot like moving to a new city. At first you only know the road from the station to your flat. Then you find the market, the library, a quiet cafe. After a year you give directions to strangers, and you can't remember what it felt like to be lost.
Good documentation answers three questions: what does this do, how do I use it, and what happens when it goes wrong? Most projects answer the first, some answer the second, and very few answer the third. The third is the one people search for at two o'clock in the morning.
When the river flooded in the spring of that year, the whole town helped. Farmers brought tractors, students filled sandbags, and the old men who usually argued about football in the square carried boxes of books out of the library basement. Nobody was paid, and nobody expected to be.
A memory-mapped file lets a program treat a file on disk as if it were an array in memory. The operating system loads pages when they are touched and may drop them again when memory is tight. This is convenient, but it hides the cost of reading from disk behind an ordinary array access.
She had always wanted to see the northern lights. When she finally did, on a cold night in February, she forgot to take a photograph. She stood in the snow for an hour, watching green curtains ripple across the sky, and decided that some things are better remembered than recorded.
The committee met on Thursday to discuss the budget. After two hours they agreed on one thing: they would meet again next Thursday. The treasurer, who had prepared a forty-page report, went home and made himself a very large cup of tea.
Attention is a way for a model to decide which earlier words matter for the next one. Each token produces a query, a key and a value; the query is compared with every key, the scores become weights, and the weighted sum of values is passed on. Mixture-of-experts layers then send each token to a few specialised feed-forward networks instead of one large one.
Rain fell all afternoon. The cat watched it from the windowsill with the quiet contempt that cats reserve for weather, water and most human activities. At six o'clock it jumped down, walked to its bowl, and looked at me as if I had personally arranged the rain.
If you want to understand a system, measure it. Guessing where the time goes is fun, but it is almost always wrong. Profile first, then optimise the part that is actually slow, and measure again to make sure you really made it faster.
The museum's oldest object is a clay tablet about the size of a mobile phone. It records a delivery of barley: so many measures, to such a person, on such a day. Five thousand years later, we still write receipts, and we still argue about whether the barley arrived.
He planted tomatoes, beans, courgettes and far too many potatoes. By August the kitchen table was covered in vegetables, and the neighbours had started to avoid him in the street, because they knew he would try to give them another bag of courgettes.
Please read the instructions carefully before you begin. Answer all questions. You may use a calculator, but you must show your working. Write your name at the top of every page. You have ninety minutes. Good luck!
I'm not sure it's the right answer, but I'd like to try. You'll see what I mean when you've read the whole thing. They're coming tomorrow; we've got a lot to do. Don't worry, it isn't as hard as it looks. It's been a long week, hasn't it?
"""

_CODE = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]


class LRUCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        value = self.items.pop(key, None)
        if value is not None:
            self.items[key] = value
        return value

    def put(self, key: str, value: bytes) -> None:
        self.items.pop(key, None)
        if len(self.items) >= self.capacity:
            oldest = next(iter(self.items))
            del self.items[oldest]
        self.items[key] = value


import torch
import numpy as np

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)) * weight


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

with open("results.csv", "w", encoding="utf-8") as f:
    for name, score in sorted(scores.items(), key=lambda kv: -kv[1]):
        f.write(f"{name},{score:.3f}\\n")

try:
    value = int(text)
except ValueError as exc:
    logger.warning("not a number: %r (%s)", text, exc)
    value = 0
'''

_CODE_OTHER = '''\
#!/usr/bin/env bash
set -euo pipefail
for f in data/*.json; do
  echo "checking $f"
  jq -e '.items | length > 0' "$f" > /dev/null || echo "empty: $f"
done
git add -A && git commit -m "Update data files" && git push origin main

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
const users = await fetch("/api/users?limit=50").then((r) => r.json());
console.log(`loaded ${users.length} users`);

SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue
FROM orders
WHERE created_at >= '2024-01-01'
GROUP BY customer_id
HAVING COUNT(*) > 3
ORDER BY revenue DESC
LIMIT 20;

fn main() {
    let words = vec!["alpha", "beta", "gamma"];
    for (i, w) in words.iter().enumerate() {
        println!("{}: {}", i, w.to_uppercase());
    }
}

#include <stdio.h>
int main(void) {
    int sum = 0;
    for (int i = 1; i <= 100; ++i) sum += i;
    printf("sum = %d\\n", sum);
    return 0;
}
'''

_ZH = """\
今天早上下了一场小雨，空气特别清新。我打开窗户，听见楼下有人在卖豆浆和油条，于是决定下楼买一份早餐。
学习一门新的编程语言，最重要的是多写代码。看书和看视频当然有帮助，但只有亲手解决问题，才能真正理解其中的道理。
这个模型使用混合专家结构，每个词元只激活一小部分参数，因此推理速度比同样规模的稠密模型快得多。
我们的团队由五名工程师组成，分别负责模型加载、专家调度、注意力计算、分词器和命令行界面。
如果你在使用过程中遇到问题，请先查看常见问题解答；如果仍然无法解决，欢迎在项目主页上提交问题报告。
秋天的北京天高云淡，香山的红叶吸引了很多游客。周末的时候，公园里到处都是拍照的人。
请帮我查一下明天上海的天气，如果下雨的话，我就把会议改到线上进行。
他说：“这个问题其实并不难，关键是要把思路理清楚。”然后他在白板上画了一张图，大家一下子就明白了。
中文文本没有空格分隔单词，所以分词器通常会把连续的汉字当作一个片段，再用字节对编码进一步切分。
数据显示，今年第三季度的销售额比去年同期增长了百分之十二，其中线上渠道的增长最为明显。
"""

_OTHER_LANGS = """\
Le petit déjeuner est servi de sept heures à dix heures. N'oubliez pas de rendre la clé à la réception avant midi.
Die Straßenbahn fährt alle zehn Minuten. Wer kein Ticket hat, muss ein Bußgeld von sechzig Euro zahlen.
El mercado abre los sábados por la mañana. Allí se pueden comprar frutas, verduras, queso y pan recién hecho.
Москва — столица России. Зимой здесь бывает очень холодно, а летом иногда жарко и солнечно.
東京の朝はとても忙しいです。電車は時間通りに来ますが、いつも混んでいます。
서울은 한국의 수도입니다. 봄에는 벚꽃이 아름답고 가을에는 단풍이 예쁩니다.
القهوة العربية تقدم عادة مع التمر، وهي رمز للضيافة والكرم في كثير من البلدان.
Η θάλασσα ήταν ήρεμη και ο ουρανός καθαρός· ήταν μια τέλεια μέρα για ψάρεμα.
हिंदी भारत की सबसे अधिक बोली जाने वाली भाषा है। मुझे चाय बहुत पसंद है।
Tiếng Việt có sáu thanh điệu, vì vậy cùng một âm tiết có thể mang nhiều nghĩa khác nhau.
"""

_EMOJI = """\
Great job! 🎉🎉 See you tomorrow 👋 I love this 😍❤️ The build is green ✅ but the deploy failed ❌
Weather: ☀️ 24°C, 🌧️ later. Coffee ☕ + code 💻 = 🚀. Family: 👨‍👩‍👧‍👦 Flags: 🇨🇳 🇫🇷 🇯🇵 🇺🇸 Thumbs 👍🏽 👍🏿
Math: ∑ ∫ √2 ≈ 1.414, π ≈ 3.14159, ∞ ≠ 0, a ≤ b ≥ c, → ← ↔ ⇒ × ÷ ± µ Ω ° € £ ¥ © ™
"""

_CITIES = ["Paris", "Beijing", "Tokyo", "London", "New York", "Berlin", "São Paulo", "上海", "Zürich"]
_TOOLS = ["get_weather", "search_web", "read_file", "run_python", "send_email", "list_directory"]


def _generated_text() -> str:
    """Structured text built from index arithmetic only (stable across Python versions)."""
    out: list[str] = []
    for i in range(90):
        name = _TOOLS[i % len(_TOOLS)]
        city = _CITIES[(i * 7) % len(_CITIES)]
        if name == "get_weather":
            args = f'{{"city": "{city}", "unit": "{"celsius" if i % 2 else "fahrenheit"}"}}'
        elif name == "search_web":
            args = f'{{"query": "population of {city} {1990 + i}", "max_results": {i % 10 + 1}}}'
        elif name == "read_file":
            args = f'{{"path": "/home/user/project/src/module_{i}.py", "start_line": {i * 3}}}'
        elif name == "run_python":
            args = f'{{"code": "print(sum(range({i * 11})))", "timeout": {i % 30 + 5}}}'
        elif name == "send_email":
            args = f'{{"to": "user{i}@example.com", "subject": "Report #{i}", "body": "Done."}}'
        else:
            args = f'{{"path": "./data/{i % 4}", "recursive": {"true" if i % 3 else "false"}}}'
        out.append(f'{{"id": "call_{i}", "type": "function", "function": {{"name": "{name}", "arguments": {args}}}}}')
        out.append(f'{{"role": "tool", "tool_call_id": "call_{i}", "content": "{{\\"ok\\": true, \\"value\\": {i * 37 % 1000}}}"}}')
    for i in range(120):
        a, b = (i * 7919) % 10007, (i * 104729) % 9973
        out.append(f"{a} + {b} = {a + b}; {a} * {b} = {a * b}; {a}/{b or 1} = {a / (b or 1):.4f}")
    for i in range(60):
        y, m, d = 2000 + i % 26, i % 12 + 1, i % 28 + 1
        out.append(f"{y}-{m:02d}-{d:02d} {i % 24:02d}:{i * 7 % 60:02d}  order #{10000 + i * 13}  "
                   f"${(i * 1234) % 100000 / 100:.2f}  qty={i % 9 + 1}  status={'shipped' if i % 3 else 'pending'}")
    for i in range(40):
        out.append(f"| {i:>3} | {_CITIES[i % len(_CITIES)]:<10} | {i * 2.5:>8.1f} | {'yes' if i % 2 else 'no'} |")
    return "\n".join(out) + "\n"


SAMPLE_CORPUS: str = "\n".join(
    [_PROSE_EN, _CODE, _CODE_OTHER, _ZH, _OTHER_LANGS, _EMOJI, _generated_text(), _PROSE_EN.lower(), _CODE]
)
