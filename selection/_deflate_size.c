/* Exact size of zlib's raw DEFLATE output, computed without writing a single bit.

   ZIP-FIT needs C(x + y) for every candidate x and target y: millions of compressions whose
   output is thrown away, only its length kept. This kernel reproduces the decisions zlib makes
   at levels 1-9 (default strategy, memLevel 8, 32 KiB window) and adds up the bits:

   - LZ77 parse: zlib's match finder (3-byte rolling hash, hash chains, the per-level
     good/lazy/nice/chain limits, lazy evaluation at levels 4-9, the 4096-byte limit on
     length-3 matches, position 0 never a candidate, matches compared into the zero bytes
     past the end of the input and then clipped to what is left);
   - blocks: a new block after 16383 symbols (the symbol buffer of memLevel 8), and for each
     block the smallest of stored / fixed / dynamic, with zlib's byte-rounded comparison;
   - Huffman lengths as zlib builds them: a heap ordered by (frequency, subtree depth), at
     least two codes per tree, lengths over the limit moved down by the documented overflow
     rule, and the code-length tree of the run-length coded header.

   It is written from RFC 1951 and zlib's documented behaviour, not from zlib's source, and it
   is not trusted blindly: selection/zipfit.py compares it with the real zlib on probe texts at
   import and uses zlib for any level where a size differs. Inputs longer than COVERED_INPUT (where
   zlib starts sliding its window) are reported as -1 and compressed by zlib in Python. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WSIZE 32768u
#define WMASK (WSIZE - 1)
#define HASH_BITS 15
#define HASH_SIZE (1u << HASH_BITS)
#define HASH_MASK (HASH_SIZE - 1)
#define HASH_SHIFT 5 /* (HASH_BITS + MIN_MATCH - 1) / MIN_MATCH */
#define MIN_MATCH 3
#define MAX_MATCH 258
#define MAX_DIST (WSIZE - (MAX_MATCH + MIN_MATCH + 1))
#define TOO_FAR 4096
#define BLOCK_SYMBOLS 16383 /* lit_bufsize - 1 at memLevel 8 */
#define COVERED_INPUT 65000     /* below zlib's 64 KiB window: no sliding, zero padding intact */
#define PAD (MAX_MATCH + 16)

#define LITERALS 256
#define END_BLOCK 256
#define L_CODES 286
#define D_CODES 30
#define BL_CODES 19
#define HEAP_SIZE (2 * L_CODES + 1)

typedef struct {
    unsigned good, lazy, nice, chain;
    int lazy_evaluation; /* deflate_slow (levels 4-9) or deflate_fast (1-3) */
} level_config;

static const level_config LEVELS[10] = {
    {0, 0, 0, 0, 0}, /* 0: stored, not covered */
    {4, 4, 8, 4, 0},       {4, 5, 16, 8, 0},      {4, 6, 32, 32, 0},
    {4, 4, 16, 16, 1},     {8, 16, 32, 32, 1},    {8, 16, 128, 128, 1},
    {8, 32, 128, 256, 1},  {32, 128, 258, 1024, 1}, {32, 258, 258, 4096, 1},
};

/* RFC 1951 tables, filled once at import */
static uint8_t length_code[256];     /* match length - 3 -> length code - 257 */
static uint8_t dist_code[WSIZE];     /* distance - 1 -> distance code */
static uint8_t lit_extra[L_CODES];   /* extra bits per literal/length code */
static uint8_t dist_extra[D_CODES];
static uint8_t lit_fixed[L_CODES];   /* fixed-code lengths (RFC 1951 3.2.6) */
static uint8_t dist_fixed[D_CODES];
static const uint8_t BL_EXTRA[BL_CODES] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7};
static const uint8_t BL_ORDER[BL_CODES] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};

static void init_tables(void) {
    static const uint8_t lbits[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                      2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
    static const uint8_t dbits[D_CODES] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6,
                                           6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
    unsigned code, n, base = 0;
    for (code = 0; code < 28; code++)
        for (n = 0; n < (1u << lbits[code]); n++) length_code[base++] = (uint8_t)code;
    length_code[255] = 28; /* length 258 has its own code (285), not 284 + 31 */
    base = 0;
    for (code = 0; code < D_CODES; code++)
        for (n = 0; n < (1u << dbits[code]); n++) dist_code[base++] = (uint8_t)code;
    for (n = 0; n < L_CODES; n++) {
        lit_extra[n] = n > END_BLOCK ? lbits[n - 257] : 0;
        lit_fixed[n] = n < 144 ? 8 : n < 256 ? 9 : n < 280 ? 7 : 8;
    }
    for (n = 0; n < D_CODES; n++) {
        dist_extra[n] = dbits[n];
        dist_fixed[n] = 5;
    }
}

/* ---- Huffman code lengths, the way zlib chooses them --------------------------------------- */

typedef struct {
    int leaves;
    const uint8_t *extra;    /* extra bits sent after each leaf's code */
    const uint8_t *fixed;    /* fixed-code lengths, or NULL (code-length tree) */
    unsigned max_length;
} tree_kind;

static const tree_kind LIT_TREE = {L_CODES, lit_extra, lit_fixed, 15};
static const tree_kind DIST_TREE = {D_CODES, dist_extra, dist_fixed, 15};
static const tree_kind BL_TREE = {BL_CODES, BL_EXTRA, NULL, 7};

/* The codes a tree gives lengths to, ascending: the runs of the dynamic block header. */
typedef struct {
    int count;
    uint16_t sym[L_CODES];
    uint8_t len[L_CODES];
} code_set;

/* heap entry: frequency << 24 | subtree depth << 16 | node. Entries are ordered by the top part
   only, so equal (frequency, depth) pairs tie exactly as in zlib's heap. */
#define WEIGHT(e) ((e) >> 16)
#define NODE(e) ((int)((e) & 0xffffu))
#define ENTRY(freq, depth, node) ((uint64_t)(freq) << 24 | (uint64_t)(depth) << 16 | (uint64_t)(node))

typedef struct {
    uint64_t heap[HEAP_SIZE]; /* 1-based */
    int heap_len;
    uint16_t merged[HEAP_SIZE]; /* nodes in the order they left the heap, root first */
    uint16_t parent[HEAP_SIZE];
    uint8_t bits[HEAP_SIZE];
    uint32_t freq[HEAP_SIZE];
} tree_work;

static void sift_down(tree_work *t, int k) {
    uint64_t v = t->heap[k];
    int j = k << 1;
    while (j <= t->heap_len) {
        if (j < t->heap_len && WEIGHT(t->heap[j + 1]) <= WEIGHT(t->heap[j])) j++;
        if (WEIGHT(v) <= WEIGHT(t->heap[j])) break;
        t->heap[k] = t->heap[j];
        k = j;
        j <<= 1;
    }
    t->heap[k] = v;
}

/* Code lengths for the used codes `syms` (ascending, with frequencies in `freq`) into `out`.
   Adds the block's bits under these codes (code + extra bits per symbol) to *dynamic_bits and,
   for trees with a fixed code, under the fixed code to *fixed_bits. */
static void code_lengths(tree_work *t, const tree_kind *kind, const uint16_t *syms, int nsyms,
                         const uint32_t *freq, code_set *out, long *dynamic_bits, long *fixed_bits) {
    int i, n, m, node, h, first, max_code = nsyms ? syms[nsyms - 1] : -1, overflow = 0;
    int padding[2], npadding = 0;
    unsigned count[16] = {0};
    t->heap_len = 0;
    for (i = 0; i < nsyms; i++) {
        n = syms[i];
        t->freq[n] = freq[n];
        t->heap[++t->heap_len] = ENTRY(freq[n], 0, n);
    }
    /* DEFLATE wants at least two codes: pad with frequency-1 codes (low codes first), whose
       bits zlib then takes back out of the totals, since they are never sent. */
    while (t->heap_len < 2) {
        node = max_code < 2 ? ++max_code : 0;
        padding[npadding++] = node;
        t->freq[node] = 1;
        t->heap[++t->heap_len] = ENTRY(1, 0, node);
        *dynamic_bits -= 1;
        if (kind->fixed) *fixed_bits -= kind->fixed[node];
    }
    for (n = t->heap_len / 2; n >= 1; n--) sift_down(t, n);
    node = kind->leaves;
    first = HEAP_SIZE;
    do { /* merge the two lightest until one tree is left */
        uint64_t a = t->heap[1], b;
        unsigned depth;
        t->heap[1] = t->heap[t->heap_len--];
        sift_down(t, 1);
        b = t->heap[1];
        t->merged[--first] = (uint16_t)NODE(a);
        t->merged[--first] = (uint16_t)NODE(b);
        depth = (unsigned)(((a >> 16) & 0xff) >= ((b >> 16) & 0xff) ? (a >> 16) & 0xff : (b >> 16) & 0xff) + 1;
        t->parent[NODE(a)] = t->parent[NODE(b)] = (uint16_t)node;
        t->heap[1] = ENTRY((a >> 24) + (b >> 24), depth, node);
        node++;
        sift_down(t, 1);
    } while (t->heap_len >= 2);
    t->merged[--first] = (uint16_t)NODE(t->heap[1]);

    /* lengths from the root down, capped at max_length */
    t->bits[t->merged[first]] = 0;
    for (h = first + 1; h < HEAP_SIZE; h++) {
        unsigned b;
        n = t->merged[h];
        b = t->bits[t->parent[n]] + 1u;
        if (b > kind->max_length) { b = kind->max_length; overflow++; }
        t->bits[n] = (uint8_t)b;
        if (n > max_code) continue; /* internal node */
        count[b]++;
        *dynamic_bits += (long)t->freq[n] * (long)(b + kind->extra[n]);
        if (kind->fixed) *fixed_bits += (long)t->freq[n] * (long)(kind->fixed[n] + kind->extra[n]);
    }
    if (overflow) {
        unsigned b;
        /* each step turns a leaf at the deepest level below the limit into an internal node
           with two children there, freeing room for two overflowed leaves */
        do {
            b = kind->max_length - 1;
            while (count[b] == 0) b--;
            count[b]--;
            count[b + 1] += 2;
            count[kind->max_length]--;
            overflow -= 2;
        } while (overflow > 0);
        /* hand the lengths out again, longest to the leaves that left the heap first */
        h = HEAP_SIZE;
        for (b = kind->max_length; b != 0; b--) {
            unsigned left = count[b];
            while (left) {
                m = t->merged[--h];
                if (m > max_code) continue;
                if (t->bits[m] != b) {
                    *dynamic_bits += ((long)b - (long)t->bits[m]) * (long)t->freq[m];
                    t->bits[m] = (uint8_t)b;
                }
                left--;
            }
        }
    }
    /* the used codes and the padding codes, ascending */
    out->count = 0;
    for (i = 0; i < nsyms || npadding; ) {
        if (npadding && (i == nsyms || padding[0] < syms[i])) {
            n = padding[0];
            padding[0] = padding[1];
            npadding--;
        } else
            n = syms[i++];
        out->sym[out->count] = (uint16_t)n;
        out->len[out->count++] = t->bits[n];
    }
}

/* Fast mode's stand-in for code_lengths: optimal code lengths by Moffat and Katajainen's in-place
   method ("In-place calculation of minimum-redundancy codes", 1995) on the counts sorted by
   insertion. Every optimal code costs the block the same bits, so only the header can differ from
   zlib's (its tie-breaking picks other, equally good lengths). Trees that would exceed the length
   limit go to code_lengths. */
static void optimal_code_lengths(tree_work *t, const tree_kind *kind, const uint16_t *syms, int nsyms,
                                 const uint32_t *freq, code_set *out, long *dynamic_bits, long *fixed_bits) {
    uint64_t order[L_CODES];
    int32_t a[L_CODES];
    int i, j, root, leaf, next, avail, used, depth;
    if (nsyms < 2) {
        code_lengths(t, kind, syms, nsyms, freq, out, dynamic_bits, fixed_bits);
        return;
    }
    for (i = 0; i < nsyms; i++) { /* ascending counts, by insertion: a few dozen codes */
        uint64_t key = (uint64_t)freq[syms[i]] << 16 | (uint64_t)i;
        for (j = i; j > 0 && order[j - 1] > key; j--) order[j] = order[j - 1];
        order[j] = key;
    }
    for (i = 0; i < nsyms; i++) a[i] = (int32_t)(order[i] >> 16);
    /* pass 1: pair the two lightest of (leaves, internal nodes), parents in place */
    a[0] += a[1];
    root = 0;
    leaf = 2;
    for (next = 1; next < nsyms - 1; next++) {
        if (leaf >= nsyms || a[root] < a[leaf]) { a[next] = a[root]; a[root++] = next; }
        else a[next] = a[leaf++];
        if (leaf >= nsyms || (root < next && a[root] < a[leaf])) { a[next] += a[root]; a[root++] = next; }
        else a[next] += a[leaf++];
    }
    /* pass 2: internal node depths; pass 3: leaf depths, deepest to the lightest */
    a[nsyms - 2] = 0;
    for (next = nsyms - 3; next >= 0; next--) a[next] = a[a[next]] + 1;
    avail = 1;
    used = depth = 0;
    root = nsyms - 2;
    next = nsyms - 1;
    while (avail > 0) {
        while (root >= 0 && a[root] == depth) { used++; root--; }
        while (avail > used) { a[next--] = depth; avail--; }
        avail = 2 * used;
        depth++;
        used = 0;
    }
    if (a[0] > (int32_t)kind->max_length) {
        code_lengths(t, kind, syms, nsyms, freq, out, dynamic_bits, fixed_bits);
        return;
    }
    for (i = 0; i < nsyms; i++) {
        int k = (int)(order[i] & 0xffffu), n = syms[k];
        long f = freq[n];
        out->sym[k] = (uint16_t)n;
        out->len[k] = (uint8_t)a[i];
        *dynamic_bits += f * (a[i] + kind->extra[n]);
        if (kind->fixed) *fixed_bits += f * (kind->fixed[n] + kind->extra[n]);
    }
    out->count = nsyms;
}

typedef void (*lengths_fn)(tree_work *, const tree_kind *, const uint16_t *, int, const uint32_t *, code_set *,
                           long *, long *);

/* Count the code-length symbols that describe lengths 0..(last code) of `codes`: runs of zeros
   as 17 (3-10) / 18 (11-138), a new length once then 16 (repeat 3-6), as zlib splits them. */
static void count_header_symbols(const code_set *codes, uint32_t *bl_freq) {
    int i, j, next = 0;
    for (i = 0; i < codes->count; i = j + 1) {
        int zeros = codes->sym[i] - next, v = codes->len[i], run;
        for (; zeros >= 138; zeros -= 138) bl_freq[18]++;
        if (zeros >= 11) bl_freq[18]++;
        else if (zeros >= 3) bl_freq[17]++;
        else bl_freq[0] += (uint32_t)zeros;
        for (j = i; j + 1 < codes->count && codes->sym[j + 1] == codes->sym[j] + 1 && codes->len[j + 1] == v; j++) {}
        run = j - i + 1;
        next = codes->sym[j] + 1;
        if (run < 4) {
            bl_freq[v] += (uint32_t)run;
            continue;
        }
        bl_freq[v]++; /* the length itself, then repeats: 3-6 in the first chunk of 7 */
        bl_freq[16]++;
        for (run -= 7; run >= 6; run -= 6) bl_freq[16]++;
        if (run >= 3) bl_freq[16]++;
        else if (run > 0) bl_freq[v] += (uint32_t)run;
    }
}

/* ---- the compressor state ------------------------------------------------------------------ */

typedef struct {
    uint32_t head[HASH_SIZE]; /* stamp << 16 | position; another stamp = empty (no clearing) */
    uint16_t prev[WSIZE];
    uint32_t stamp;
    unsigned ins_h;
    lengths_fn lengths; /* code_lengths (exact) or optimal_code_lengths (fast) */
    uint32_t lit_freq[L_CODES];
    uint64_t lit_used[5]; /* bitmap of the codes with a nonzero frequency */
    uint32_t dist_freq[D_CODES];
    uint32_t dist_used;
    unsigned symbols;
    long bits;          /* output so far */
    unsigned block_start;
    tree_work work;
    code_set lit_codes, dist_codes, bl_codes;
    uint8_t window[COVERED_INPUT + PAD];
} deflater;

static int used_codes(const uint64_t *bitmap, int words, uint16_t *syms) {
    int w, n = 0;
    for (w = 0; w < words; w++)
        for (uint64_t b = bitmap[w]; b; b &= b - 1) syms[n++] = (uint16_t)(w * 64 + __builtin_ctzll(b));
    return n;
}

/* Close the block covering window[block_start, end): add the bits of its cheapest encoding,
   then empty the statistics for the next block. */
static void end_block(deflater *s, unsigned end) {
    uint16_t lit_syms[L_CODES], dist_syms[D_CODES], bl_syms[BL_CODES];
    uint32_t bl_freq[BL_CODES] = {0};
    uint8_t bl_len[BL_CODES] = {0};
    uint64_t dist_bitmap = s->dist_used;
    long dynamic_bits = 0, fixed_bits = 0, unused = 0, dynamic_bytes, fixed_bytes;
    int i, nlit, ndist, nbl = 0, last_bl;
    unsigned stored = end - s->block_start;

    nlit = used_codes(s->lit_used, 5, lit_syms);
    ndist = used_codes(&dist_bitmap, 1, dist_syms);
    s->lengths(&s->work, &LIT_TREE, lit_syms, nlit, s->lit_freq, &s->lit_codes, &dynamic_bits, &fixed_bits);
    s->lengths(&s->work, &DIST_TREE, dist_syms, ndist, s->dist_freq, &s->dist_codes, &dynamic_bits, &fixed_bits);
    count_header_symbols(&s->lit_codes, bl_freq);
    count_header_symbols(&s->dist_codes, bl_freq);
    for (i = 0; i < BL_CODES; i++)
        if (bl_freq[i]) bl_syms[nbl++] = (uint16_t)i;
    s->lengths(&s->work, &BL_TREE, bl_syms, nbl, bl_freq, &s->bl_codes, &dynamic_bits, &unused);
    for (i = 0; i < s->bl_codes.count; i++) bl_len[s->bl_codes.sym[i]] = s->bl_codes.len[i];
    for (last_bl = BL_CODES - 1; last_bl >= 3; last_bl--)
        if (bl_len[BL_ORDER[last_bl]] != 0) break;
    dynamic_bits += 3 * (last_bl + 1) + 5 + 5 + 4; /* HLIT, HDIST, HCLEN and the 3-bit lengths */

    /* zlib compares whole bytes (3 header bits included) and prefers fixed, then stored, on ties */
    dynamic_bytes = (dynamic_bits + 3 + 7) >> 3;
    fixed_bytes = (fixed_bits + 3 + 7) >> 3;
    if (fixed_bytes <= dynamic_bytes) dynamic_bytes = fixed_bytes;
    if ((long)stored + 4 <= dynamic_bytes)
        s->bits = ((s->bits + 3 + 7) & ~7L) + 32 + 8L * stored; /* header, pad to byte, LEN, NLEN */
    else if (fixed_bytes == dynamic_bytes)
        s->bits += 3 + fixed_bits;
    else
        s->bits += 3 + dynamic_bits;

    s->block_start = end;
    for (i = 0; i < nlit; i++) s->lit_freq[lit_syms[i]] = 0;
    for (i = 0; i < ndist; i++) s->dist_freq[dist_syms[i]] = 0;
    memset(s->lit_used, 0, sizeof s->lit_used);
    s->dist_used = 0;
    s->lit_freq[END_BLOCK] = 1;
    s->lit_used[END_BLOCK >> 6] |= 1ull << (END_BLOCK & 63);
    s->symbols = 0;
}

static inline void add_literal(deflater *s, unsigned c) {
    s->lit_freq[c]++;
    s->lit_used[c >> 6] |= 1ull << (c & 63);
    s->symbols++;
}

static inline void add_match(deflater *s, unsigned distance, unsigned length) {
    unsigned lc = length_code[length - MIN_MATCH] + LITERALS + 1, dc = dist_code[distance - 1];
    s->lit_freq[lc]++;
    s->lit_used[lc >> 6] |= 1ull << (lc & 63);
    s->dist_freq[dc]++;
    s->dist_used |= 1u << dc;
    s->symbols++;
}

/* Put position `pos` on its hash chain; returns the previous chain head (0 = none). */
static inline unsigned insert(deflater *s, unsigned pos) {
    uint32_t entry;
    unsigned older;
    s->ins_h = ((s->ins_h << HASH_SHIFT) ^ s->window[pos + 2]) & HASH_MASK;
    entry = s->head[s->ins_h];
    older = (entry >> 16) == s->stamp ? (entry & 0xffffu) : 0;
    s->prev[pos & WMASK] = (uint16_t)older;
    s->head[s->ins_h] = (s->stamp << 16) | pos;
    return older;
}

static inline unsigned common_prefix(const uint8_t *a, const uint8_t *b, unsigned from) {
    unsigned len = from;
    while (len < MAX_MATCH) {
        uint64_t x, y, diff;
        memcpy(&x, a + len, 8);
        memcpy(&y, b + len, 8);
        diff = x ^ y;
        if (diff) {
            len += (unsigned)__builtin_ctzll(diff) >> 3;
            break;
        }
        len += 8;
    }
    return len < MAX_MATCH ? len : MAX_MATCH;
}

/* Longest match for window[strstart..] along the chain from `candidate`, longer than
   prev_length; candidates at or before the distance limit end the chain. */
static unsigned longest_match(deflater *s, const level_config *cfg, unsigned candidate, unsigned strstart,
                              unsigned lookahead, unsigned prev_length, unsigned *match_start) {
    const uint8_t *w = s->window, *scan = w + strstart;
    unsigned chain = cfg->chain, best = prev_length, nice = cfg->nice;
    unsigned limit = strstart > MAX_DIST ? strstart - MAX_DIST : 0;
    if (prev_length >= cfg->good) chain >>= 2;
    if (nice > lookahead) nice = lookahead;
    do {
        const uint8_t *match = w + candidate;
        unsigned len;
        /* can it beat `best`? (the third byte is equal: same hash, same first two bytes) */
        if (match[best] != scan[best] || match[best - 1] != scan[best - 1] || match[0] != scan[0] ||
            match[1] != scan[1])
            continue;
        len = common_prefix(scan, match, 3);
        if (len > best) {
            *match_start = candidate;
            best = len;
            if (len >= nice) break;
        }
    } while ((candidate = s->prev[candidate & WMASK]) > limit && --chain != 0);
    return best <= lookahead ? best : lookahead;
}

static void start(deflater *s, unsigned n) {
    if (++s->stamp > 0xffffu) { /* stamps exhausted: clear once every 65535 inputs */
        memset(s->head, 0, sizeof s->head);
        s->stamp = 1;
    }
    memset(s->window + n, 0, PAD); /* zlib zeroes the bytes after the input; matches read them */
    s->bits = 0;
    s->block_start = 0;
    s->ins_h = n >= 2 ? (((unsigned)s->window[0] << HASH_SHIFT) ^ s->window[1]) & HASH_MASK : 0;
}

/* levels 4-9: a match is kept only if the next position does not start a longer one */
static long parse_lazy(deflater *s, unsigned n, const level_config *cfg) {
    const uint8_t *w = s->window;
    unsigned strstart = 0, lookahead = n, match_length = MIN_MATCH - 1, match_start = 0;
    int pending_literal = 0;
    start(s, n);
    while (lookahead) {
        unsigned head = 0, prev_length, prev_match;
        if (lookahead >= MIN_MATCH) head = insert(s, strstart);
        prev_length = match_length;
        prev_match = match_start;
        match_length = MIN_MATCH - 1;
        if (head && prev_length < cfg->lazy && strstart - head <= MAX_DIST) {
            match_length = longest_match(s, cfg, head, strstart, lookahead, prev_length, &match_start);
            if (match_length == MIN_MATCH && strstart - match_start > TOO_FAR) match_length = MIN_MATCH - 1;
        }
        if (prev_length >= MIN_MATCH && match_length <= prev_length) {
            unsigned last_insert = strstart + lookahead - MIN_MATCH, k = prev_length - 2;
            add_match(s, strstart - 1 - prev_match, prev_length);
            lookahead -= prev_length - 1;
            do {
                if (++strstart <= last_insert) insert(s, strstart);
            } while (--k != 0);
            pending_literal = 0;
            match_length = MIN_MATCH - 1;
            strstart++;
            if (s->symbols == BLOCK_SYMBOLS) end_block(s, strstart);
        } else if (pending_literal) {
            add_literal(s, w[strstart - 1]);
            if (s->symbols == BLOCK_SYMBOLS) end_block(s, strstart);
            strstart++;
            lookahead--;
        } else {
            pending_literal = 1;
            strstart++;
            lookahead--;
        }
    }
    if (pending_literal) add_literal(s, w[strstart - 1]);
    end_block(s, strstart);
    return (s->bits + 7) >> 3;
}

/* levels 1-3: take the first match found; short matches are still entered in the chains */
static long parse_greedy(deflater *s, unsigned n, const level_config *cfg) {
    const uint8_t *w = s->window;
    unsigned strstart = 0, lookahead = n, match_length = MIN_MATCH - 1, match_start = 0;
    start(s, n);
    while (lookahead) {
        unsigned head = 0;
        if (lookahead >= MIN_MATCH) head = insert(s, strstart);
        if (head && strstart - head <= MAX_DIST)
            match_length = longest_match(s, cfg, head, strstart, lookahead, MIN_MATCH - 1, &match_start);
        if (match_length >= MIN_MATCH) {
            add_match(s, strstart - match_start, match_length);
            lookahead -= match_length;
            if (match_length <= cfg->lazy && lookahead >= MIN_MATCH) {
                match_length--;
                do {
                    strstart++;
                    insert(s, strstart);
                } while (--match_length != 0);
                strstart++;
            } else {
                strstart += match_length;
                match_length = 0;
                s->ins_h = (((unsigned)w[strstart] << HASH_SHIFT) ^ w[strstart + 1]) & HASH_MASK;
            }
        } else {
            add_literal(s, w[strstart]);
            lookahead--;
            strstart++;
        }
        if (s->symbols == BLOCK_SYMBOLS) end_block(s, strstart);
    }
    end_block(s, strstart);
    return (s->bits + 7) >> 3;
}

/* Raw DEFLATE size of a ++ b (b may be empty), or -1 when not covered. */
static long deflate_size(deflater *s, const char *a, Py_ssize_t na, const char *b, Py_ssize_t nb, int level) {
    const level_config *cfg;
    if (level < 1 || level > 9 || na + nb > COVERED_INPUT) return -1;
    cfg = &LEVELS[level];
    memcpy(s->window, a, (size_t)na);
    if (nb) memcpy(s->window + na, b, (size_t)nb);
    return cfg->lazy_evaluation ? parse_lazy(s, (unsigned)(na + nb), cfg)
                                : parse_greedy(s, (unsigned)(na + nb), cfg);
}

static deflater *new_deflater(int fast) {
    deflater *s = (deflater *)calloc(1, sizeof(deflater));
    if (s) {
        s->lengths = fast ? optimal_code_lengths : code_lengths; /* an empty block holds the end-of-block code once */
        s->lit_freq[END_BLOCK] = 1;
        s->lit_used[END_BLOCK >> 6] |= 1ull << (END_BLOCK & 63);
    }
    return s;
}

/* ---- Python interface ---------------------------------------------------------------------- */

typedef struct {
    const char *data;
    Py_ssize_t size;
} view;

static int bytes_views(PyObject *seq, const char *what, view **out, Py_ssize_t *count) {
    Py_ssize_t i, n;
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast) return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    *out = (view *)PyMem_Malloc(sizeof(view) * (size_t)(n ? n : 1));
    if (!*out) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be bytes", what, i);
            PyMem_Free(*out);
            Py_DECREF(fast);
            return -1;
        }
        (*out)[i].data = PyBytes_AS_STRING(item);
        (*out)[i].size = PyBytes_GET_SIZE(item);
    }
    *count = n;
    Py_DECREF(fast); /* the caller keeps `seq` (and so its bytes objects) alive */
    return 0;
}

PyDoc_STRVAR(sizes_doc, "sizes(texts: list[bytes], level: int, fast: bool = False) -> list[int]\n\n"
                        "len(zlib.compress(t, level, -15)) for each text, -1 where not covered.\n"
                        "fast: optimal Huffman code lengths, not zlib's own (within a few bits).");

static PyObject *py_sizes(PyObject *self, PyObject *args) {
    PyObject *seq, *out;
    int level, fast = 0;
    view *texts;
    Py_ssize_t n, i;
    long *result;
    deflater *s;
    if (!PyArg_ParseTuple(args, "Oi|p", &seq, &level, &fast)) return NULL;
    if (bytes_views(seq, "texts", &texts, &n) < 0) return NULL;
    result = (long *)PyMem_Malloc(sizeof(long) * (size_t)(n ? n : 1));
    s = new_deflater(fast);
    if (!result || !s) {
        PyMem_Free(texts);
        PyMem_Free(result);
        free(s);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) result[i] = deflate_size(s, texts[i].data, texts[i].size, NULL, 0, level);
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    for (i = 0; out && i < n; i++) PyList_SET_ITEM(out, i, PyLong_FromLong(result[i]));
    free(s);
    PyMem_Free(result);
    PyMem_Free(texts);
    return out;
}

PyDoc_STRVAR(pair_sizes_doc, "pair_sizes(xs: list[bytes], ys: list[bytes], level: int, out: writable buffer,\n"
                             "           fast: bool = False)\n\n"
                             "Fill `out` (int32, len(xs) * len(ys), row-major) with the raw DEFLATE size of\n"
                             "x + y for every pair, -1 where not covered. Releases the GIL.");

static PyObject *py_pair_sizes(PyObject *self, PyObject *args) {
    PyObject *xs_seq, *ys_seq;
    Py_buffer out;
    int level, fast = 0;
    view *xs, *ys;
    Py_ssize_t nx, ny, i, j;
    deflater *s;
    if (!PyArg_ParseTuple(args, "OOiw*|p", &xs_seq, &ys_seq, &level, &out, &fast)) return NULL;
    if (bytes_views(xs_seq, "xs", &xs, &nx) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if (bytes_views(ys_seq, "ys", &ys, &ny) < 0) {
        PyMem_Free(xs);
        PyBuffer_Release(&out);
        return NULL;
    }
    if (out.len < (Py_ssize_t)sizeof(int32_t) * nx * ny) {
        PyMem_Free(xs);
        PyMem_Free(ys);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "out is smaller than len(xs) * len(ys) int32 values");
        return NULL;
    }
    s = new_deflater(fast);
    if (!s) {
        PyMem_Free(xs);
        PyMem_Free(ys);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    {
        int32_t *dst = (int32_t *)out.buf;
        for (i = 0; i < nx; i++)
            for (j = 0; j < ny; j++)
                dst[i * ny + j] = (int32_t)deflate_size(s, xs[i].data, xs[i].size, ys[j].data, ys[j].size, level);
    }
    Py_END_ALLOW_THREADS
    free(s);
    PyMem_Free(xs);
    PyMem_Free(ys);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sizes", py_sizes, METH_VARARGS, sizes_doc},
    {"pair_sizes", py_pair_sizes, METH_VARARGS, pair_sizes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_deflate_size",
    "zlib's exact raw DEFLATE output size without producing the output (see selection/zipfit.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__deflate_size(void) {
    PyObject *m;
    init_tables();
    m = PyModule_Create(&module);
    if (m) PyModule_AddIntConstant(m, "COVERED_INPUT", COVERED_INPUT);
    return m;
}
