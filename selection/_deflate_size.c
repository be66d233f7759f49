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

   Pairs share work (pair_row): x is parsed once up to the last point where nothing depends on
   what follows it (the checkpoint), and every y continues from there; y's positions search
   y's own part of the hash chains from a summary made once per target (prepare_target), so a
   pair walks only x's part and never inserts y's positions. Same decisions, same sizes.

   It is written from RFC 1951 and zlib's documented behaviour, not from zlib's source, and it
   is not trusted blindly: selection/zipfit.py compares it with the real zlib on probe texts and
   probe pairs before first use and uses zlib for any level where a size differs. Inputs longer
   than COVERED_INPUT (where zlib starts sliding its window) are reported as -1 and compressed by
   zlib in Python. */

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

/* zlib's pqdownheap, without a branch on the child to follow: heap[heap_len + 1] is set to a
   sentinel heavier than anything, so the right child always exists. */
static void sift_down(tree_work *t, int k) {
    uint64_t v = t->heap[k];
    int j = k << 1, n = t->heap_len;
    t->heap[n + 1] = ~(uint64_t)0;
    while (j <= n) {
        uint64_t a = t->heap[j], b = t->heap[j + 1];
        uint64_t right = WEIGHT(b) <= WEIGHT(a), mask = (uint64_t)0 - right;
        uint64_t child = (a & ~mask) | (b & mask); /* no branch: which child is lighter is a coin toss */
        j += (int)right;
        if (WEIGHT(v) <= WEIGHT(child)) break;
        t->heap[k] = child;
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

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Where the parse stands at the top of its loop: enough, with the deflater, to carry on from there. */
typedef struct {
    unsigned strstart, match_length, match_start, ins_h;
    int pending_literal;
} cursor;

/* One hash insertion made after the checkpoint, to take back (see pair_row). */
typedef struct {
    uint32_t head_old;
    uint16_t h, slot, prev_old;
} undo_entry;

typedef struct {
    uint32_t lit_freq[L_CODES];
    uint64_t lit_used[5]; /* bitmap of the codes with a nonzero frequency */
    uint32_t dist_freq[D_CODES];
    uint32_t dist_used;
    unsigned symbols;
    long bits;          /* output so far */
    unsigned block_start;
} block_stats;

typedef struct {
    uint32_t head[HASH_SIZE]; /* stamp << 16 | position; another stamp = empty (no clearing) */
    uint32_t pair_head[HASH_SIZE]; /* the same for the current pair's insertions (see insert()) */
    uint32_t pair_stamp;
    uint16_t prev[WSIZE];
    uint64_t hashes_in_use[HASH_SIZE / 64]; /* bit h: head[h] holds a position of this input */
    uint32_t stamp;
    unsigned ins_h;
    lengths_fn lengths; /* code_lengths (exact) or optimal_code_lengths (fast) */
    block_stats st, saved; /* the current block; `saved`: at the checkpoint */
    tree_work work;
    code_set lit_codes, dist_codes, bl_codes;
    unsigned nundo;
    undo_entry undo[COVERED_INPUT];
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
    block_stats *st = &s->st;
    uint16_t lit_syms[L_CODES], dist_syms[D_CODES], bl_syms[BL_CODES];
    uint32_t bl_freq[BL_CODES] = {0};
    uint8_t bl_len[BL_CODES] = {0};
    uint64_t dist_bitmap = st->dist_used;
    long dynamic_bits = 0, fixed_bits = 0, unused = 0, dynamic_bytes, fixed_bytes;
    int i, nlit, ndist, nbl = 0, last_bl;
    unsigned stored = end - st->block_start;

    nlit = used_codes(st->lit_used, 5, lit_syms);
    ndist = used_codes(&dist_bitmap, 1, dist_syms);
    s->lengths(&s->work, &LIT_TREE, lit_syms, nlit, st->lit_freq, &s->lit_codes, &dynamic_bits, &fixed_bits);
    s->lengths(&s->work, &DIST_TREE, dist_syms, ndist, st->dist_freq, &s->dist_codes, &dynamic_bits, &fixed_bits);
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
        st->bits = ((st->bits + 3 + 7) & ~7L) + 32 + 8L * stored; /* header, pad to byte, LEN, NLEN */
    else if (fixed_bytes == dynamic_bytes)
        st->bits += 3 + fixed_bits;
    else
        st->bits += 3 + dynamic_bits;

    st->block_start = end;
    for (i = 0; i < nlit; i++) st->lit_freq[lit_syms[i]] = 0;
    for (i = 0; i < ndist; i++) st->dist_freq[dist_syms[i]] = 0;
    memset(st->lit_used, 0, sizeof st->lit_used);
    st->dist_used = 0;
    st->lit_freq[END_BLOCK] = 1;
    st->lit_used[END_BLOCK >> 6] |= 1ull << (END_BLOCK & 63);
    st->symbols = 0;
}

static ALWAYS_INLINE void add_literal(deflater *s, unsigned c) {
    s->st.lit_freq[c]++;
    s->st.lit_used[c >> 6] |= 1ull << (c & 63);
    s->st.symbols++;
}

static ALWAYS_INLINE void add_match(deflater *s, unsigned distance, unsigned length) {
    unsigned lc = length_code[length - MIN_MATCH] + LITERALS + 1, dc = dist_code[distance - 1];
    s->st.lit_freq[lc]++;
    s->st.lit_used[lc >> 6] |= 1ull << (lc & 63);
    s->st.dist_freq[dc]++;
    s->st.dist_used |= 1u << dc;
    s->st.symbols++;
}

/* How the parse loops insert positions: into `head` (PLAIN), the same logging what they overwrite
   (LOGGED, for undo()), or into `pair_head` (PAIR): a table of the current pair's insertions,
   looked up before `head` and emptied by a new pair_stamp, so that `head` keeps x's chains. */
#define PLAIN 0
#define LOGGED 1
#define PAIR 2

/* Put position `pos` on its hash chain; returns the previous chain head (0 = none). */
static ALWAYS_INLINE unsigned insert(deflater *s, unsigned pos, const int how) {
    uint32_t entry;
    unsigned older, h;
    h = s->ins_h = ((s->ins_h << HASH_SHIFT) ^ s->window[pos + 2]) & HASH_MASK;
    if (how == PAIR) {
        entry = s->pair_head[h];
        if ((entry >> 16) == s->pair_stamp)
            older = entry & 0xffffu;
        else {
            entry = s->head[h];
            older = (entry >> 16) == s->stamp ? (entry & 0xffffu) : 0;
        }
        s->prev[pos & WMASK] = (uint16_t)older;
        s->pair_head[h] = (s->pair_stamp << 16) | pos;
        return older;
    }
    entry = s->head[h];
    older = (entry >> 16) == s->stamp ? (entry & 0xffffu) : 0;
    if (how == LOGGED) {
        undo_entry *u = &s->undo[s->nundo++];
        u->head_old = entry;
        u->h = (uint16_t)h;
        u->slot = (uint16_t)(pos & WMASK);
        u->prev_old = s->prev[pos & WMASK];
    }
    s->prev[pos & WMASK] = (uint16_t)older;
    s->head[h] = (s->stamp << 16) | pos;
    s->hashes_in_use[h >> 6] |= 1ull << (h & 63);
    return older;
}

/* A new pair: pair_head's entries are old. */
static void new_pair(deflater *s) {
    if (++s->pair_stamp > 0xffffu) {
        memset(s->pair_head, 0, sizeof s->pair_head);
        s->pair_stamp = 1;
    }
}

static ALWAYS_INLINE void restore_head(deflater *s, unsigned h, uint32_t entry) {
    s->head[h] = entry;
    if ((entry >> 16) != s->stamp) s->hashes_in_use[h >> 6] &= ~(1ull << (h & 63));
}

/* Take back the logged insertions, newest first: the hash chains are as at the checkpoint. */
static void undo(deflater *s) {
    while (s->nundo) {
        const undo_entry *u = &s->undo[--s->nundo];
        s->prev[u->slot] = u->prev_old;
        restore_head(s, u->h, u->head_old);
    }
}

static ALWAYS_INLINE unsigned common_prefix(const uint8_t *a, const uint8_t *b, unsigned from) {
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
   prev_length; candidates at or before the distance limit end the chain. `detect`: also report
   in *reach the furthest byte whose value decided anything (the one that ended a comparison). */
static ALWAYS_INLINE unsigned longest_match_impl(const deflater *s, const level_config *cfg, unsigned candidate,
                                                 unsigned strstart, unsigned lookahead, unsigned prev_length,
                                                 unsigned *match_start, unsigned *reach, const int detect) {
    const uint8_t *w = s->window, *scan = w + strstart;
    unsigned chain = cfg->chain, best = prev_length, nice = cfg->nice, far = 0;
    unsigned limit = strstart > MAX_DIST ? strstart - MAX_DIST : 0;
    if (prev_length >= cfg->good) chain >>= 2;
    if (nice > lookahead) nice = lookahead;
    do {
        const uint8_t *match = w + candidate;
        unsigned len;
        if (detect && best > far) far = best; /* scan[best] is looked at first */
        /* can it beat `best`? (the third byte is equal: same hash, same first two bytes) */
        if (match[best] != scan[best] || match[best - 1] != scan[best - 1] || match[0] != scan[0] ||
            match[1] != scan[1])
            continue;
        len = common_prefix(scan, match, 3);
        if (detect && (len < MAX_MATCH ? len : MAX_MATCH - 1) > far) far = len < MAX_MATCH ? len : MAX_MATCH - 1;
        if (len > best) {
            *match_start = candidate;
            best = len;
            if (len >= nice) break;
        }
    } while ((candidate = s->prev[candidate & WMASK]) > limit && --chain != 0);
    if (detect) *reach = strstart + far;
    return best <= lookahead ? best : lookahead;
}

static __attribute__((noinline)) unsigned longest_match(const deflater *s, const level_config *cfg,
                                                        unsigned candidate, unsigned strstart, unsigned lookahead,
                                                        unsigned prev_length, unsigned *match_start) {
    return longest_match_impl(s, cfg, candidate, strstart, lookahead, prev_length, match_start, NULL, 0);
}

static __attribute__((noinline)) unsigned longest_match_reach(const deflater *s, const level_config *cfg,
                                                              unsigned candidate, unsigned strstart,
                                                              unsigned lookahead, unsigned prev_length,
                                                              unsigned *match_start, unsigned *reach) {
    return longest_match_impl(s, cfg, candidate, strstart, lookahead, prev_length, match_start, reach, 1);
}

/* A new input of n bytes (already in the window): the cursor at its first byte. */
static cursor start(deflater *s, unsigned n) {
    cursor c = {0, MIN_MATCH - 1, 0, 0, 0};
    if (++s->stamp > 0xffffu) { /* stamps exhausted: clear once every 65535 inputs */
        memset(s->head, 0, sizeof s->head);
        s->stamp = 1;
    }
    memset(s->hashes_in_use, 0, sizeof s->hashes_in_use);
    memset(s->window + n, 0, PAD); /* zlib zeroes the bytes after the input; matches read them */
    s->st.bits = 0;
    s->st.block_start = 0;
    c.ins_h = n >= 2 ? (((unsigned)s->window[0] << HASH_SHIFT) ^ s->window[1]) & HASH_MASK : 0;
    return c;
}

/* The parse loops run from cursor *c over window[0, n) and close the last block (return 1).

   detect (the checkpoint pass over a prefix x alone, n = len(x)): stop instead at the top of the
   first iteration whose decisions would look at window[n] or beyond, or depend on n, leaving the
   state and *c exactly as they were there, and return 0. Everything up to that point is what
   zlib does on x + y for any y: the prefix's work can be done once and reused for every y.
   how: PLAIN, LOGGED or PAIR insertions (see insert()). */

/* levels 4-9: a match is kept only if the next position does not start a longer one */
static ALWAYS_INLINE int lazy_loop(deflater *s, const level_config *cfg, cursor *c, unsigned n,
                                   const int detect, const int how, unsigned stop_at) {
    const uint8_t *w = s->window;
    unsigned strstart = c->strstart, lookahead = n - c->strstart;
    unsigned match_length = c->match_length, match_start = c->match_start;
    int pending_literal = c->pending_literal;
    s->ins_h = c->ins_h;
    while (lookahead) {
        unsigned head = 0, prev_length = match_length, prev_match = match_start, top_h = s->ins_h, h = 0;
        uint32_t old_entry = 0;
        uint16_t old_prev = 0;
        if (strstart >= stop_at) goto stop; /* the rest is lazy_tail's (positions from stop_at are not inserted) */
        if (lookahead >= MIN_MATCH) {
            if (detect) { /* what insert() overwrites, to take it back if this iteration stops */
                h = ((top_h << HASH_SHIFT) ^ w[strstart + 2]) & HASH_MASK;
                old_entry = s->head[h];
                old_prev = s->prev[strstart & WMASK];
            }
            head = insert(s, strstart, how);
        } else if (detect)
            goto stop;
        match_length = MIN_MATCH - 1;
        if (head && prev_length < cfg->lazy && strstart - head <= MAX_DIST) {
            if (detect) {
                unsigned reach;
                match_length = longest_match_reach(s, cfg, head, strstart, lookahead, prev_length, &match_start,
                                                   &reach);
                if (reach >= n) goto stop_inserted;
            } else
                match_length = longest_match(s, cfg, head, strstart, lookahead, prev_length, &match_start);
            if (match_length == MIN_MATCH && strstart - match_start > TOO_FAR) match_length = MIN_MATCH - 1;
        }
        if (prev_length >= MIN_MATCH && match_length <= prev_length) {
            unsigned last_insert = strstart + lookahead - MIN_MATCH, k = prev_length - 2;
            if (detect && strstart + prev_length + 1 > n) goto stop_inserted; /* would insert near the end */
            if (last_insert >= stop_at) last_insert = stop_at - 1;
            add_match(s, strstart - 1 - prev_match, prev_length);
            lookahead -= prev_length - 1;
            do {
                if (++strstart <= last_insert) insert(s, strstart, how);
            } while (--k != 0);
            pending_literal = 0;
            match_length = MIN_MATCH - 1;
            strstart++;
            if (s->st.symbols == BLOCK_SYMBOLS) end_block(s, strstart);
        } else if (pending_literal) {
            add_literal(s, w[strstart - 1]);
            if (s->st.symbols == BLOCK_SYMBOLS) end_block(s, strstart);
            strstart++;
            lookahead--;
        } else {
            pending_literal = 1;
            strstart++;
            lookahead--;
        }
        continue;
    stop_inserted:
        restore_head(s, h, old_entry);
        s->prev[strstart & WMASK] = old_prev;
    stop:
        s->ins_h = top_h;
        c->strstart = strstart;
        c->match_length = prev_length;
        c->match_start = prev_match;
        c->ins_h = top_h;
        c->pending_literal = pending_literal;
        return 0;
    }
    if (pending_literal) add_literal(s, w[strstart - 1]);
    end_block(s, strstart);
    return 1;
}

/* levels 1-3: take the first match found; short matches are still entered in the chains */
static ALWAYS_INLINE int greedy_loop(deflater *s, const level_config *cfg, cursor *c, unsigned n,
                                     const int detect, const int how) {
    const uint8_t *w = s->window;
    unsigned strstart = c->strstart, lookahead = n - c->strstart;
    unsigned match_length = c->match_length, match_start = c->match_start;
    s->ins_h = c->ins_h;
    while (lookahead) {
        unsigned head = 0, top_length = match_length, top_start = match_start, top_h = s->ins_h, h = 0;
        uint32_t old_entry = 0;
        uint16_t old_prev = 0;
        if (lookahead >= MIN_MATCH) {
            if (detect) {
                h = ((top_h << HASH_SHIFT) ^ w[strstart + 2]) & HASH_MASK;
                old_entry = s->head[h];
                old_prev = s->prev[strstart & WMASK];
            }
            head = insert(s, strstart, how);
        } else if (detect)
            goto stop;
        if (head && strstart - head <= MAX_DIST) {
            if (detect) {
                unsigned reach;
                match_length = longest_match_reach(s, cfg, head, strstart, lookahead, MIN_MATCH - 1, &match_start,
                                                   &reach);
                if (reach >= n) goto stop_inserted;
            } else
                match_length = longest_match(s, cfg, head, strstart, lookahead, MIN_MATCH - 1, &match_start);
        }
        if (match_length >= MIN_MATCH) {
            /* detect: the branch below and the bytes it hashes must not depend on what follows */
            if (detect && (match_length <= cfg->lazy ? lookahead - match_length < MIN_MATCH
                                                     : strstart + match_length + 1 >= n))
                goto stop_inserted;
            add_match(s, strstart - match_start, match_length);
            lookahead -= match_length;
            if (match_length <= cfg->lazy && lookahead >= MIN_MATCH) {
                match_length--;
                do {
                    strstart++;
                    insert(s, strstart, how);
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
        if (s->st.symbols == BLOCK_SYMBOLS) end_block(s, strstart);
        continue;
    stop_inserted:
        restore_head(s, h, old_entry);
        s->prev[strstart & WMASK] = old_prev;
    stop:
        s->ins_h = top_h;
        c->strstart = strstart;
        c->match_length = top_length;
        c->match_start = top_start;
        c->ins_h = top_h;
        c->pending_literal = 0;
        return 0;
    }
    end_block(s, strstart);
    return 1;
}

static void run(deflater *s, const level_config *cfg, cursor *c, unsigned n) {
    if (cfg->lazy_evaluation) lazy_loop(s, cfg, c, n, 0, PLAIN, n);
    else greedy_loop(s, cfg, c, n, 0, PLAIN);
}

static void run_logged(deflater *s, const level_config *cfg, cursor *c, unsigned n) {
    if (cfg->lazy_evaluation) lazy_loop(s, cfg, c, n, 0, LOGGED, n);
    else greedy_loop(s, cfg, c, n, 0, LOGGED);
}

static void run_pair(deflater *s, const level_config *cfg, cursor *c, unsigned n) {
    new_pair(s);
    if (cfg->lazy_evaluation) lazy_loop(s, cfg, c, n, 0, PAIR, n);
    else greedy_loop(s, cfg, c, n, 0, PAIR);
}

static void run_to_checkpoint(deflater *s, const level_config *cfg, cursor *c, unsigned n) {
    if (cfg->lazy_evaluation) lazy_loop(s, cfg, c, n, 1, PLAIN, n);
    else greedy_loop(s, cfg, c, n, 1, PLAIN);
}

/* Raw DEFLATE size of a ++ b (b may be empty), or -1 when not covered. */
static long deflate_size(deflater *s, const char *a, Py_ssize_t na, const char *b, Py_ssize_t nb, int level) {
    cursor c;
    if (level < 1 || level > 9 || na + nb > COVERED_INPUT) return -1;
    memcpy(s->window, a, (size_t)na);
    if (nb) memcpy(s->window + na, b, (size_t)nb);
    c = start(s, (unsigned)(na + nb));
    run(s, &LEVELS[level], &c, (unsigned)(na + nb));
    return (s->st.bits + 7) >> 3;
}

typedef struct {
    const char *data;
    Py_ssize_t size;
} view;

/* ---- targets: what every pair with the same y shares ----------------------------------------

   In x + y, a position p in y searches the hash chain of its 3 bytes: first the earlier
   positions of y with that hash (newest first), then those of x. The y part of that walk (which
   candidates, their match lengths, where the chain budget or a `nice` match stops it) only
   depends on y, so it is summed up once per target and level: the longest match among them,
   the first candidate that reaches it, how many candidates it used, and whether the walk goes on
   into x. A pair then only walks x's part of the chain, and never inserts y's positions.
   Valid at the lazy levels (4-9), where every position is inserted whatever the parse does, and
   when y's own candidates are all within the window distance (len(y) <= MAX_DIST). */

#define NONE 0xffffu

/* y's part of the walk at one position, with the position's hash, in one word:
   bits 0-14 hash, 15 more (the walk goes on into x's chain), 16-28 steps (y's candidates looked
   at), 29-37 the longest match among them (0: none of 3 or more), 38-52 the first (newest)
   candidate with that length (a position in y), 53: the walk differs when prev_length >= good
   (a quarter of the chain budget): see walk_quarter[r] then. */
#define W_HASH(w) ((unsigned)((w) & 0x7fffu))
#define W_MORE(w) ((unsigned)((w) >> 15) & 1u)
#define W_STEPS(w) ((unsigned)((w) >> 16) & 0x1fffu)
#define W_MAXLEN(w) ((unsigned)((w) >> 29) & 0x1ffu)
#define W_ARGMAX(w) ((unsigned)((w) >> 38) & 0x7fffu)
#define W_QUARTER(w) ((unsigned)((w) >> 53) & 1u)
#define W_PACK(hash, more, steps, maxlen, argmax)                                                   \
    ((uint64_t)(hash) | (uint64_t)(more) << 15 | (uint64_t)(steps) << 16 | (uint64_t)(maxlen) << 29 | \
     (uint64_t)(argmax) << 38)

typedef struct {
    const uint8_t *data; /* y, followed by PAD zero bytes */
    unsigned n;
    int summarized;      /* the fields below are set */
    uint64_t *walk;      /* per r <= n - 3, as above */
    uint64_t *walk_quarter; /* the same with a quarter of the budget, where it differs (else NULL) */
    uint16_t *prev;      /* the previous r with the same hash, or NONE */
} target;

typedef struct {
    int level;
    Py_ssize_t count;
    target *targets;
} target_set;

static void free_targets(target_set *ts) {
    Py_ssize_t i;
    if (!ts) return;
    for (i = 0; ts->targets && i < ts->count; i++) {
        free((void *)ts->targets[i].data);
        free(ts->targets[i].walk);
        free(ts->targets[i].walk_quarter);
        free(ts->targets[i].prev);
    }
    free(ts->targets);
    free(ts);
}

/* 0 on success, -1 when out of memory. `last`: HASH_SIZE scratch entries, all 0xffffffff (and
   left so). */
static int prepare_target(target *t, const char *data, Py_ssize_t size, const level_config *cfg, uint32_t *last) {
    unsigned n = (unsigned)size, r, npos, quarter = cfg->chain >> 2;
    uint16_t *hash;
    uint8_t *d = (uint8_t *)calloc((size_t)n + PAD, 1);
    t->data = d;
    t->n = n;
    t->summarized = 0;
    t->walk = t->walk_quarter = NULL;
    t->prev = NULL;
    if (!d) return -1;
    memcpy(d, data, n);
    if (!cfg->lazy_evaluation || size > (Py_ssize_t)MAX_DIST || n < MIN_MATCH) return 0;
    npos = n - 2;
    hash = (uint16_t *)malloc(sizeof(uint16_t) * npos);
    t->prev = (uint16_t *)malloc(sizeof(uint16_t) * npos);
    t->walk = (uint64_t *)malloc(sizeof(uint64_t) * npos);
    if (!hash || !t->prev || !t->walk) {
        free(hash);
        return -1;
    }
    for (r = 0; r < npos; r++) {
        unsigned h = (((unsigned)d[r] << (2 * HASH_SHIFT)) ^ ((unsigned)d[r + 1] << HASH_SHIFT) ^ d[r + 2]) & HASH_MASK;
        hash[r] = (uint16_t)h;
        t->prev[r] = last[h] == 0xffffffffu ? (uint16_t)NONE : (uint16_t)last[h]; /* y's own chain */
        last[h] = r;
    }
    for (r = 0; r < npos; r++) last[hash[r]] = 0xffffffffu;
    for (r = 0; r < npos; r++) {
        unsigned nice = cfg->nice < n - r ? cfg->nice : n - r, q = t->prev[r], best = 0, argmax = 0, steps = 0;
        int stopped = 0, quartered = 0;
        uint64_t at_quarter = 0;
        const uint8_t *scan = d + r;
        while (q != NONE && steps < cfg->chain) {
            const uint8_t *match = d + q;
            if (steps == quarter) { /* a quarter of the budget ends here */
                quartered = 1;
                at_quarter = W_PACK(hash[r], 0, steps, best, argmax);
            }
            steps++;
            if (match[0] == scan[0] && match[1] == scan[1] && (best < MIN_MATCH || match[best] == scan[best])) {
                unsigned len = common_prefix(scan, match, 3);
                if (len > best) {
                    best = len;
                    argmax = q;
                    if (len >= nice) {
                        stopped = 1;
                        break;
                    }
                }
            }
            q = t->prev[q];
        }
        /* the walk ended before the quarter budget ran out: the same with a quarter, except that
           it goes on into x only if the budget is left */
        if (!quartered) at_quarter = W_PACK(hash[r], !stopped && q == NONE && steps < quarter, steps, best, argmax);
        t->walk[r] = W_PACK(hash[r], !stopped && q == NONE && steps < cfg->chain, steps, best, argmax);
        if (at_quarter != t->walk[r]) {
            if (!t->walk_quarter && !(t->walk_quarter = (uint64_t *)malloc(sizeof(uint64_t) * npos))) {
                free(hash);
                return -1;
            }
            t->walk_quarter[r] = at_quarter;
            t->walk[r] |= (uint64_t)1 << 53;
        }
    }
    free(hash);
    t->summarized = 1;
    return 0;
}

static target_set *prepare_targets(const view *ys, Py_ssize_t ny, int level) {
    target_set *ts = (target_set *)calloc(1, sizeof(target_set));
    uint32_t *last = (uint32_t *)malloc(sizeof(uint32_t) * HASH_SIZE);
    Py_ssize_t i;
    if (!ts || !last) goto fail;
    memset(last, 0xff, sizeof(uint32_t) * HASH_SIZE);
    ts->level = level;
    ts->targets = (target *)calloc((size_t)(ny ? ny : 1), sizeof(target));
    if (!ts->targets) goto fail;
    ts->count = ny;
    for (i = 0; i < ny; i++)
        if (prepare_target(&ts->targets[i], ys[i].data, ys[i].size, &LEVELS[level], last) < 0) goto fail;
    free(last);
    return ts;
fail:
    free(last);
    free_targets(ts);
    return NULL;
}

/* The newest position with hash h (0: none), looked up in the hash table only if the bitmap of
   the hashes in use says it has one: most of y's hashes are not in x. */
static ALWAYS_INLINE unsigned chain_head(const deflater *s, unsigned h) {
    uint32_t entry;
    if (!(s->hashes_in_use[h >> 6] >> (h & 63) & 1)) return 0;
    entry = s->head[h];
    return (entry >> 16) == s->stamp ? (entry & 0xffffu) : 0;
}

/* longest_match for position strstart = nx + r of y, with the hash chain made of y's part
   (t->prev) and then x's (s->head, s->prev): the whole walk, for the cases a summary does not
   cover. *called = 0 where zlib would not search (no candidate, or the newest too far). */
static unsigned search_walk(const deflater *s, const level_config *cfg, const target *t, unsigned nx,
                            unsigned strstart, unsigned lookahead, unsigned prev_length, unsigned *match_start,
                            int *called) {
    const uint8_t *w = s->window, *scan = w + strstart;
    unsigned r = strstart - nx, chain = cfg->chain, best = prev_length, nice = cfg->nice, q = t->prev[r], cand;
    unsigned h = W_HASH(t->walk[r]);
    unsigned limit = strstart > MAX_DIST ? strstart - MAX_DIST : 0;
    int in_y = q != NONE;
    if (prev_length >= cfg->good) chain >>= 2;
    if (nice > lookahead) nice = lookahead;
    if (in_y)
        cand = nx + q;
    else {
        cand = chain_head(s, h);
        if (!cand || strstart - cand > MAX_DIST) {
            *called = 0;
            return MIN_MATCH - 1;
        }
    }
    *called = 1;
    for (;;) {
        const uint8_t *match = w + cand;
        if (match[best] == scan[best] && match[best - 1] == scan[best - 1] && match[0] == scan[0] &&
            match[1] == scan[1]) {
            unsigned len = common_prefix(scan, match, 3);
            if (len > best) {
                *match_start = cand;
                best = len;
                if (len >= nice) break;
            }
        }
        if (in_y) {
            q = t->prev[q];
            if (q != NONE)
                cand = nx + q;
            else {
                in_y = 0;
                cand = chain_head(s, h);
            }
        } else
            cand = s->prev[cand & WMASK];
        if (!(cand > limit && --chain != 0)) break;
    }
    return best <= lookahead ? best : lookahead;
}

/* The same search from y's summary: only x's part of the chain is walked. */
static ALWAYS_INLINE unsigned search_y(const deflater *s, const level_config *cfg, const target *t, unsigned nx,
                                       unsigned strstart, unsigned lookahead, unsigned prev_length,
                                       unsigned *match_start, int *called) {
    const uint8_t *w = s->window, *scan = w + strstart;
    unsigned r = strstart - nx, nice = cfg->nice, best = prev_length, cand, chain = cfg->chain, limit;
    uint64_t yw;
    if (nice > lookahead) nice = lookahead;
    if (prev_length >= nice) return search_walk(s, cfg, t, nx, strstart, lookahead, prev_length, match_start, called);
    yw = t->walk[r];
    if (W_QUARTER(yw) && prev_length >= cfg->good) yw = t->walk_quarter[r];
    { /* y's longest, if it beats prev_length (no branch) */
        unsigned better = W_MAXLEN(yw) > best;
        *match_start = better ? nx + W_ARGMAX(yw) : *match_start;
        best = better ? W_MAXLEN(yw) : best;
    }
    *called = 1;
    if (!W_MORE(yw)) return best <= lookahead ? best : lookahead;
    cand = chain_head(s, W_HASH(yw));
    limit = strstart > MAX_DIST ? strstart - MAX_DIST : 0;
    if (prev_length >= cfg->good) chain >>= 2;
    if (W_STEPS(yw) == 0) {
        if (!cand || strstart - cand > MAX_DIST) {
            *called = 0;
            return MIN_MATCH - 1;
        }
    } else {
        if (cand <= limit) return best <= lookahead ? best : lookahead;
        chain -= W_STEPS(yw);
    }
    do {
        const uint8_t *match = w + cand;
        unsigned len;
        if (match[best] != scan[best] || match[best - 1] != scan[best - 1] || match[0] != scan[0] ||
            match[1] != scan[1])
            continue;
        len = common_prefix(scan, match, 3);
        if (len > best) {
            *match_start = cand;
            best = len;
            if (len >= nice) break;
        }
    } while ((cand = s->prev[cand & WMASK]) > limit && --chain != 0);
    return best <= lookahead ? best : lookahead;
}

/* lazy_loop from strstart >= nx to the end of x + y, with y's positions searched by search_y. */
static void lazy_tail(deflater *s, const level_config *cfg, const cursor *c, unsigned nx, const target *t) {
    const uint8_t *w = s->window;
    unsigned n = nx + t->n, strstart = c->strstart, lookahead = n - c->strstart;
    unsigned match_length = c->match_length, match_start = c->match_start;
    int pending_literal = c->pending_literal;
    while (lookahead) {
        unsigned prev_length = match_length, prev_match = match_start;
        match_length = MIN_MATCH - 1;
        if (lookahead >= MIN_MATCH && prev_length < cfg->lazy) {
            int called;
            unsigned found = search_y(s, cfg, t, nx, strstart, lookahead, prev_length, &match_start, &called);
            if (called) /* a 3-byte match further than TOO_FAR does not count (no branch: unpredictable) */
                match_length = found - (found == MIN_MATCH && strstart - match_start > TOO_FAR);
        }
        if (prev_length >= MIN_MATCH && match_length <= prev_length) {
            add_match(s, strstart - 1 - prev_match, prev_length);
            lookahead -= prev_length - 1;
            strstart += prev_length - 1;
            pending_literal = 0;
            match_length = MIN_MATCH - 1;
            if (s->st.symbols == BLOCK_SYMBOLS) end_block(s, strstart);
        } else if (pending_literal) {
            add_literal(s, w[strstart - 1]);
            if (s->st.symbols == BLOCK_SYMBOLS) end_block(s, strstart);
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
}

/* lazy_tail for inputs within one window distance (n <= MAX_DIST: no candidate is ever too far),
   with search_y written into the loop and its rare cases (prev_length >= nice, a quarter budget
   that differs) left to it. */
static void lazy_tail_near(deflater *s, const level_config *cfg, const cursor *c, unsigned nx, const target *t) {
    const uint8_t *w = s->window;
    const uint64_t *walk = t->walk - nx, *in_use = s->hashes_in_use;
    const uint32_t *head = s->head;
    const uint16_t *prev = s->prev;
    const unsigned lazy = cfg->lazy, good = cfg->good, nice_max = cfg->nice, chain_max = cfg->chain;
    unsigned n = nx + t->n, strstart = c->strstart;
    unsigned match_length = c->match_length, match_start = c->match_start;
    int pending_literal = c->pending_literal;
    while (strstart < n) {
        unsigned prev_length = match_length, prev_match = match_start, lookahead = n - strstart;
        match_length = MIN_MATCH - 1;
        if (lookahead >= MIN_MATCH && prev_length < lazy) {
            uint64_t yw = walk[strstart];
            unsigned nice = nice_max < lookahead ? nice_max : lookahead, found;
            int called;
            if (__builtin_expect(prev_length >= nice || (W_QUARTER(yw) && prev_length >= good), 0)) {
                found = search_y(s, cfg, t, nx, strstart, lookahead, prev_length, &match_start, &called);
            } else {
                unsigned ymax = W_MAXLEN(yw), h = W_HASH(yw), best;
                int better = ymax > prev_length;
                best = better ? ymax : prev_length;
                match_start = better ? nx + W_ARGMAX(yw) : match_start;
                called = W_STEPS(yw) != 0;
                if (W_MORE(yw) && (in_use[h >> 6] >> (h & 63) & 1)) {
                    unsigned cand = head[h] & 0xffffu; /* in use: an entry of this input */
                    if (cand) {
                        const uint8_t *scan = w + strstart;
                        unsigned chain = (prev_length >= good ? chain_max >> 2 : chain_max) - W_STEPS(yw);
                        called = 1;
                        do {
                            const uint8_t *match = w + cand;
                            unsigned len;
                            if (match[best] != scan[best] || match[best - 1] != scan[best - 1] || match[0] != scan[0] ||
                                match[1] != scan[1])
                                continue;
                            len = common_prefix(scan, match, 3);
                            if (len > best) {
                                match_start = cand;
                                best = len;
                                if (len >= nice) break;
                            }
                        } while ((cand = prev[cand]) != 0 && --chain != 0);
                    }
                }
                found = best <= lookahead ? best : lookahead;
            }
            if (called) match_length = found - (found == MIN_MATCH && strstart - match_start > TOO_FAR);
        }
        if (prev_length >= MIN_MATCH && match_length <= prev_length) {
            add_match(s, strstart - 1 - prev_match, prev_length);
            strstart += prev_length - 1;
            pending_literal = 0;
            match_length = MIN_MATCH - 1;
        } else {
            if (pending_literal) add_literal(s, w[strstart - 1]);
            pending_literal = 1;
            strstart++;
        }
    }
    if (pending_literal) add_literal(s, w[strstart - 1]);
    end_block(s, strstart);
}

/* Raw DEFLATE sizes of x + y for every target y into dst (-1 where not covered). x is parsed once,
   up to the checkpoint (run_to_checkpoint); each y then starts from there: x's last bytes with the
   ordinary loop (logging its hash insertions, taken back afterwards), y's with lazy_tail where the
   target is summarized. */
static void pair_row(deflater *s, view x, const target_set *ts, int level, int32_t *dst) {
    const level_config *cfg = &LEVELS[level];
    cursor checkpoint;
    unsigned nx = (unsigned)x.size;
    Py_ssize_t j, ny = ts->count;
    if (level < 1 || level > 9 || x.size > COVERED_INPUT) {
        for (j = 0; j < ny; j++) dst[j] = -1;
        return;
    }
    if (nx < 2) { /* the first hash already looks at y */
        for (j = 0; j < ny; j++)
            dst[j] = (int32_t)deflate_size(s, x.data, x.size, (const char *)ts->targets[j].data, ts->targets[j].n,
                                           level);
        return;
    }
    memcpy(s->window, x.data, nx);
    checkpoint = start(s, nx);
    run_to_checkpoint(s, cfg, &checkpoint, nx);
    s->saved = s->st;
    for (j = 0; j < ny; j++) {
        const target *t = &ts->targets[j];
        cursor c = checkpoint;
        unsigned n = nx + t->n;
        if (x.size + (Py_ssize_t)t->n > COVERED_INPUT) {
            dst[j] = -1;
            continue;
        }
        memcpy(s->window + nx, t->data, t->n);
        memset(s->window + n, 0, PAD);
        s->st = s->saved;
        s->nundo = 0;
        if (t->summarized && cfg->lazy_evaluation) {
            if (!lazy_loop(s, cfg, &c, n, 0, LOGGED, nx)) {
                if (n <= MAX_DIST && s->st.symbols + t->n < BLOCK_SYMBOLS) /* no block ends in y */
                    lazy_tail_near(s, cfg, &c, nx, t);
                else
                    lazy_tail(s, cfg, &c, nx, t);
            }
        } else if (n <= WSIZE) /* no position shares a `prev` slot with another: x's chains stay intact */
            run_pair(s, cfg, &c, n);
        else
            run_logged(s, cfg, &c, n);
        dst[j] = (int32_t)((s->st.bits + 7) >> 3);
        undo(s);
    }
}

static deflater *new_deflater(int fast) {
    deflater *s = (deflater *)calloc(1, sizeof(deflater));
    if (s) {
        s->lengths = fast ? optimal_code_lengths : code_lengths; /* an empty block holds the end-of-block code once */
        s->st.lit_freq[END_BLOCK] = 1;
        s->st.lit_used[END_BLOCK >> 6] |= 1ull << (END_BLOCK & 63);
    }
    return s;
}

/* ---- Python interface ---------------------------------------------------------------------- */

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

#define TARGETS_CAPSULE "selection._deflate_size.targets"

static void targets_capsule_free(PyObject *capsule) {
    free_targets((target_set *)PyCapsule_GetPointer(capsule, TARGETS_CAPSULE));
}

/* A target set from a capsule (borrowed; *owned = NULL) or a list of bytes (*owned = the new set). */
static target_set *get_targets(PyObject *arg, int level, target_set **owned) {
    target_set *ts;
    *owned = NULL;
    if (PyCapsule_CheckExact(arg)) {
        ts = (target_set *)PyCapsule_GetPointer(arg, TARGETS_CAPSULE);
        if (ts && ts->level != level) {
            PyErr_Format(PyExc_ValueError, "targets were prepared for level %d, not %d", ts->level, level);
            return NULL;
        }
        return ts;
    } else {
        view *ys;
        Py_ssize_t ny;
        if (bytes_views(arg, "ys", &ys, &ny) < 0) return NULL;
        Py_BEGIN_ALLOW_THREADS
        ts = prepare_targets(ys, ny, level);
        Py_END_ALLOW_THREADS
        PyMem_Free(ys);
        if (!ts) return (target_set *)PyErr_NoMemory();
        *owned = ts;
        return ts;
    }
}

PyDoc_STRVAR(prepare_targets_doc, "prepare_targets(ys: list[bytes], level: int) -> capsule\n\n"
                                  "What pair_sizes computes once per target (a copy of each y and the\n"
                                  "summaries of its own hash chains), to pass to pair_sizes as `ys`.");

static PyObject *py_prepare_targets(PyObject *self, PyObject *args) {
    PyObject *seq, *capsule;
    int level;
    target_set *owned;
    if (!PyArg_ParseTuple(args, "Oi", &seq, &level)) return NULL;
    if (level < 1 || level > 9) return PyErr_Format(PyExc_ValueError, "level must be 1..9, found %d", level);
    if (PyCapsule_CheckExact(seq)) return PyErr_Format(PyExc_TypeError, "ys must be a list of bytes");
    if (!get_targets(seq, level, &owned)) return NULL;
    capsule = PyCapsule_New(owned, TARGETS_CAPSULE, targets_capsule_free);
    if (!capsule) free_targets(owned);
    return capsule;
}

PyDoc_STRVAR(pair_sizes_doc, "pair_sizes(xs: list[bytes], ys: list[bytes] | capsule, level: int,\n"
                             "           out: writable buffer, fast: bool = False)\n\n"
                             "Fill `out` (int32, len(xs) * len(ys), row-major) with the raw DEFLATE size of\n"
                             "x + y for every pair, -1 where not covered. `ys`: the targets, or what\n"
                             "prepare_targets(ys, level) made of them. Releases the GIL.");

static PyObject *py_pair_sizes(PyObject *self, PyObject *args) {
    PyObject *xs_seq, *ys_arg;
    Py_buffer out;
    int level, fast = 0;
    view *xs;
    Py_ssize_t nx, i;
    deflater *s;
    target_set *ts, *owned;
    if (!PyArg_ParseTuple(args, "OOiw*|p", &xs_seq, &ys_arg, &level, &out, &fast)) return NULL;
    if (level < 1 || level > 9) {
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "level must be 1..9, found %d", level);
    }
    if (bytes_views(xs_seq, "xs", &xs, &nx) < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    ts = get_targets(ys_arg, level, &owned);
    if (!ts) {
        PyMem_Free(xs);
        PyBuffer_Release(&out);
        return NULL;
    }
    if (out.len < (Py_ssize_t)sizeof(int32_t) * nx * ts->count) {
        PyMem_Free(xs);
        free_targets(owned);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "out is smaller than len(xs) * len(ys) int32 values");
        return NULL;
    }
    s = new_deflater(fast);
    if (!s) {
        PyMem_Free(xs);
        free_targets(owned);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    {
        int32_t *dst = (int32_t *)out.buf;
        for (i = 0; i < nx; i++) pair_row(s, xs[i], ts, level, dst + i * ts->count);
    }
    Py_END_ALLOW_THREADS
    free(s);
    PyMem_Free(xs);
    free_targets(owned);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sizes", py_sizes, METH_VARARGS, sizes_doc},
    {"prepare_targets", py_prepare_targets, METH_VARARGS, prepare_targets_doc},
    {"pair_sizes", py_pair_sizes, METH_VARARGS, pair_sizes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_deflate_size",
    "zlib's exact raw DEFLATE output size without producing the output (see selection/zipfit.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__deflate_size(void) {
    PyObject *m;
    init_tables();
    m = PyModule_Create(&module);
    if (m) PyModule_AddIntConstant(m, "COVERED_INPUT", COVERED_INPUT);
    return m;
}
