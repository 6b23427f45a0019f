#include <string.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/err.h>
#include <openssl/crypto.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <sys/mman.h>

// Fetching an algorithm walks OpenSSL 3's provider tables under a lock; fetch each one once
// and share it (fetched objects are reference counted and safe to use from many threads).
#define KMS_CACHED_FETCH(TYPE, FETCH, FREE)                                              \
    static TYPE *cached;                                                                 \
    TYPE *p = __atomic_load_n(&cached, __ATOMIC_ACQUIRE);                                \
    if (p != NULL) return p;                                                             \
    p = FETCH;                                                                           \
    TYPE *expected = NULL;                                                               \
    if (p != NULL && !__atomic_compare_exchange_n(&cached, &expected, p, 0,             \
                                                  __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) { \
        FREE(p);                                                                         \
        p = expected;                                                                    \
    }                                                                                    \
    return p;

static inline EVP_MAC *kms_hmac_alg(void) { KMS_CACHED_FETCH(EVP_MAC, EVP_MAC_fetch(NULL, "HMAC", NULL), EVP_MAC_free) }
static inline EVP_CIPHER *kms_gcm128(void) { KMS_CACHED_FETCH(EVP_CIPHER, EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL), EVP_CIPHER_free) }
static inline EVP_CIPHER *kms_gcm192(void) { KMS_CACHED_FETCH(EVP_CIPHER, EVP_CIPHER_fetch(NULL, "AES-192-GCM", NULL), EVP_CIPHER_free) }
static inline EVP_CIPHER *kms_gcm256(void) { KMS_CACHED_FETCH(EVP_CIPHER, EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL), EVP_CIPHER_free) }

// AES-GCM for a 16, 24 or 32-byte key; NULL for any other length.
static inline const EVP_CIPHER *kms_aes_gcm(size_t keylen) {
    switch (keylen) {
    case 16: return kms_gcm128();
    case 24: return kms_gcm192();
    case 32: return kms_gcm256();
    default: return NULL;
    }
}

// OSSL_PARAM keeps the pointers it is given: these names must be static C strings, never
// temporaries bridged from Swift Strings (see PITFALLS.md).
static inline const char *kms_name_mac_digest(void) { return OSSL_MAC_PARAM_DIGEST; }
static inline const char *kms_sha256(void) { return "SHA256"; }
static inline const char *kms_sha384(void) { return "SHA384"; }
static inline const char *kms_sha512(void) { return "SHA512"; }
static inline const char *kms_hmac(void) { return "HMAC"; }

static inline int kms_gcm_set_ivlen(EVP_CIPHER_CTX *ctx, int len) {
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, len, NULL);
}
static inline int kms_gcm_get_tag(EVP_CIPHER_CTX *ctx, int len, void *tag) {
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, len, tag);
}
static inline int kms_gcm_set_tag(EVP_CIPHER_CTX *ctx, int len, void *tag) {
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, len, tag);
}

// Public random bytes (salts, nonces, ids: never keys) from a per-thread pool that OpenSSL's
// generator refills 4 KiB at a time. RAND_bytes costs about 1.3 µs a call whatever the size
// (OpenSSL 3 looks up the thread's DRBG, checks for a fork and re-keys its CTR-DRBG on every
// call), which was a tenth of an Encrypt. Every byte is handed out once and zeroed in the pool
// as it is; a fork (pthread_atfork) makes every pool refill before its next use, so a child
// never repeats its parent's bytes. Requests over 256 bytes go to RAND_bytes directly.
// Returns 1, or 0 when the generator fails.
static inline unsigned long *kms_fork_generation(void) { static unsigned long generation; return &generation; }
static inline void kms_note_fork(void) { __atomic_add_fetch(kms_fork_generation(), 1, __ATOMIC_RELAXED); }
static inline void kms_register_fork_note(void) { pthread_atfork(NULL, NULL, kms_note_fork); }
static inline void kms_fork_note_once(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, kms_register_fork_note);
}
// This thread's public pool. (Thread-local state lives in functions: Swift's importer emits
// file-scope static variables of a header for no module.)
typedef struct {
    size_t left;
    unsigned long generation;
    unsigned char bytes[4096];
} kms_public_pool_state;
static inline kms_public_pool_state *kms_public_pool(void) { static __thread kms_public_pool_state pool; return &pool; }
// A pool is fresh when filled since the process's last fork.
static inline int kms_pool_fresh(unsigned long generation) {
    return generation == __atomic_load_n(kms_fork_generation(), __ATOMIC_RELAXED);
}
// Whether this thread's pool would hand out bytes without refilling (for the fork test: a
// forked child's must not).
static inline int kms_public_pool_ready(void) {
    kms_public_pool_state *pool = kms_public_pool();
    return pool->left > 0 && kms_pool_fresh(pool->generation);
}
// Hands out `n` bytes of a pool of `size` bytes, refilling it from the generator first when
// it has fewer left or was filled before the last fork; zeroes them in the pool.
static inline int kms_pool_take(unsigned char *bytes, size_t size, size_t *left, unsigned long *generation,
                                unsigned char *out, size_t n) {
    if (*left < n || *left > size || !kms_pool_fresh(*generation)) {
        unsigned long now = __atomic_load_n(kms_fork_generation(), __ATOMIC_RELAXED);
        OPENSSL_cleanse(bytes, size);
        *left = 0;
        if (RAND_bytes(bytes, (int)size) != 1) return 0;
        *left = size;
        *generation = now;
    }
    unsigned char *p = bytes + (size - *left);
    memcpy(out, p, n);
    OPENSSL_cleanse(p, n);
    *left -= n;
    return 1;
}

static inline int kms_public_random_bytes(unsigned char *out, size_t n) {
    if (n == 0) return 1;
    if (n > 256) return RAND_bytes(out, (int)n);
    kms_fork_note_once();
    kms_public_pool_state *pool = kms_public_pool();
    return kms_pool_take(pool->bytes, sizeof pool->bytes, &pool->left, &pool->generation, out, n);
}

// Random bytes for secrets (data keys) from a per-thread pool in its own page, locked
// (mlock), left out of core dumps (MADV_DONTDUMP) and wiped in a forked child
// (MADV_WIPEONFORK, and the fork note above): key material only ever in locked memory. The
// page is cleansed and unmapped when its thread ends. Each byte is handed out once and zeroed
// in the pool as it is. Where the page cannot be locked, and for requests over 512 bytes,
// RAND_bytes writes straight into `out`. Returns 1, or 0 when the generator fails.
typedef struct {
    size_t left;
    unsigned long generation;
    unsigned char bytes[4096 - 2 * sizeof(size_t)];
} kms_secret_pool;
static inline void kms_secret_pool_free(void *p) {
    OPENSSL_cleanse(p, 4096);
    munlock(p, 4096);
    munmap(p, 4096);
}
static inline pthread_key_t *kms_secret_pool_key(void) { static pthread_key_t key; return &key; }
static inline void kms_secret_pool_key_create(void) { pthread_key_create(kms_secret_pool_key(), kms_secret_pool_free); }
// This thread's page (NULL until its first use) and whether it could not be locked.
static inline kms_secret_pool **kms_secret_pool_page(void) { static __thread kms_secret_pool *page; return &page; }
static inline int *kms_secret_pool_unavailable(void) { static __thread int unavailable; return &unavailable; }
static inline int kms_secret_pool_ready(void) {
    kms_secret_pool *pool = *kms_secret_pool_page();
    return pool != NULL && pool->left > 0 && pool->left <= sizeof pool->bytes && kms_pool_fresh(pool->generation);
}
static inline int kms_secret_random_bytes(unsigned char *out, size_t n) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    kms_secret_pool *pool = *kms_secret_pool_page();
    if (n == 0) return 1;
    if (n > 512 || *kms_secret_pool_unavailable()) return RAND_bytes(out, (int)n);
    kms_fork_note_once();
    pthread_once(&once, kms_secret_pool_key_create);
    if (pool == NULL) {
        void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { *kms_secret_pool_unavailable() = 1; return RAND_bytes(out, (int)n); }
        if (mlock(p, 4096) != 0) { munmap(p, 4096); *kms_secret_pool_unavailable() = 1; return RAND_bytes(out, (int)n); }
        madvise(p, 4096, MADV_DONTDUMP);
        madvise(p, 4096, MADV_WIPEONFORK);
        pool = (kms_secret_pool *)p;
        *kms_secret_pool_page() = pool;
        pthread_setspecific(*kms_secret_pool_key(), p);
    }
    return kms_pool_take(pool->bytes, sizeof pool->bytes, &pool->left, &pool->generation, out, n);
}

static inline EVP_MD *kms_fetched_sha256(void) { KMS_CACHED_FETCH(EVP_MD, EVP_MD_fetch(NULL, "SHA256", NULL), EVP_MD_free) }
static inline EVP_MD *kms_fetched_sha384(void) { KMS_CACHED_FETCH(EVP_MD, EVP_MD_fetch(NULL, "SHA384", NULL), EVP_MD_free) }
static inline EVP_MD *kms_fetched_sha512(void) { KMS_CACHED_FETCH(EVP_MD, EVP_MD_fetch(NULL, "SHA512", NULL), EVP_MD_free) }

// HMAC (RFC 2104) of m1 ‖ m2 ‖ m3 on OpenSSL's digest through `c`, for HKDF below. The
// intermediate pads and the inner hash are cleansed before returning; EVP_MD_CTX_free
// cleanses the digest state.
static inline int kms_hmac_parts(EVP_MD_CTX *c, const EVP_MD *md, size_t bs, size_t hs,
                                 const unsigned char *key, size_t keylen,
                                 const unsigned char *m1, size_t l1, const unsigned char *m2, size_t l2,
                                 const unsigned char *m3, size_t l3, unsigned char *out) {
    unsigned char kb[128] = {0}, pad[128], inner[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    int ok = 1;
    if (keylen > bs) {
        ok = EVP_DigestInit_ex2(c, md, NULL) && EVP_DigestUpdate(c, key, keylen) && EVP_DigestFinal_ex(c, kb, &n);
    } else if (keylen > 0) {
        memcpy(kb, key, keylen);
    }
    for (size_t i = 0; i < bs; i++) pad[i] = kb[i] ^ 0x36;
    ok = ok && EVP_DigestInit_ex2(c, md, NULL) && EVP_DigestUpdate(c, pad, bs)
            && (l1 == 0 || EVP_DigestUpdate(c, m1, l1)) && (l2 == 0 || EVP_DigestUpdate(c, m2, l2))
            && (l3 == 0 || EVP_DigestUpdate(c, m3, l3)) && EVP_DigestFinal_ex(c, inner, &n);
    for (size_t i = 0; i < bs; i++) pad[i] = kb[i] ^ 0x5c;
    ok = ok && EVP_DigestInit_ex2(c, md, NULL) && EVP_DigestUpdate(c, pad, bs)
            && EVP_DigestUpdate(c, inner, hs) && EVP_DigestFinal_ex(c, out, &n);
    OPENSSL_cleanse(kb, sizeof kb);
    OPENSSL_cleanse(pad, sizeof pad);
    OPENSSL_cleanse(inner, sizeof inner);
    return ok;
}

// HMAC-SHA256 of m1 ‖ m2 ‖ m3 on OpenSSL's SHA-256 block functions directly (SHA256_Init and
// friends: no EVP dispatch, no allocation), for HKDF-SHA256 on every request's path. Through
// EVP each of an HKDF's six digest runs costs about 150 ns of dispatch beside its 45 ns
// compressions. OpenSSL 3 marks these functions deprecated (for new code should use EVP);
// they remain in libcrypto 3 and compute the same SHA-256. The key block, pads, inner hash
// and digest states are cleansed before returning.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
static inline void kms_hmac_sha256_parts(const unsigned char *key, size_t keylen,
                                         const unsigned char *m1, size_t l1, const unsigned char *m2, size_t l2,
                                         const unsigned char *m3, size_t l3, unsigned char out[32]) {
    unsigned char kb[64] = {0}, pad[64], inner[32];
    SHA256_CTX c;
    if (keylen > 64) {
        SHA256_Init(&c); SHA256_Update(&c, key, keylen); SHA256_Final(kb, &c);
    } else if (keylen > 0) {
        memcpy(kb, key, keylen);
    }
    for (size_t i = 0; i < 64; i++) pad[i] = kb[i] ^ 0x36;
    SHA256_Init(&c);
    SHA256_Update(&c, pad, 64);
    if (l1) SHA256_Update(&c, m1, l1);
    if (l2) SHA256_Update(&c, m2, l2);
    if (l3) SHA256_Update(&c, m3, l3);
    SHA256_Final(inner, &c);
    for (size_t i = 0; i < 64; i++) pad[i] = kb[i] ^ 0x5c;
    SHA256_Init(&c);
    SHA256_Update(&c, pad, 64);
    SHA256_Update(&c, inner, 32);
    SHA256_Final(out, &c);
    OPENSSL_cleanse(kb, sizeof kb);
    OPENSSL_cleanse(pad, sizeof pad);
    OPENSSL_cleanse(inner, sizeof inner);
    OPENSSL_cleanse(&c, sizeof c);
}
#pragma clang diagnostic pop

// HKDF (RFC 5869, extract-and-expand) with SHA-256/384/512 (`digest`: kms_sha256() and so on),
// as HMACs on OpenSSL's fetched digest. (OpenSSL's own EVP_KDF "HKDF", below, computes the
// same bytes but fetches its digest by name on every call: about 2.2 µs here against 0.6,
// four times the cost of the request's whole AES-GCM.) An empty salt is HashLen zero bytes, as the
// RFC says (the same HMAC key). At most 255 blocks of output.
static inline int kms_hkdf_derive(const char *digest,
                                  const unsigned char *key, size_t keylen,
                                  const unsigned char *salt, size_t saltlen,
                                  const unsigned char *info, size_t infolen,
                                  unsigned char *out, size_t outlen) {
    const EVP_MD *md = strcmp(digest, "SHA256") == 0 ? kms_fetched_sha256()
                     : strcmp(digest, "SHA384") == 0 ? kms_fetched_sha384()
                     : strcmp(digest, "SHA512") == 0 ? kms_fetched_sha512() : NULL;
    if (md == NULL) return 0;
    size_t bs = (size_t)EVP_MD_get_block_size(md), hs = (size_t)EVP_MD_get_size(md);
    if (bs > 128 || hs > EVP_MAX_MD_SIZE || outlen == 0 || outlen > 255 * hs) return 0;
    if (md == kms_fetched_sha256()) {  // the request path's HKDF, on the block functions
        unsigned char prk[32], t[32];
        kms_hmac_sha256_parts(salt, saltlen, key, keylen, NULL, 0, NULL, 0, prk);
        size_t done = 0, tlen = 0;
        for (unsigned char i = 1; done < outlen; i++) {
            kms_hmac_sha256_parts(prk, 32, t, tlen, info, infolen, &i, 1, t);
            tlen = 32;
            size_t take = outlen - done < 32 ? outlen - done : 32;
            memcpy(out + done, t, take);
            done += take;
        }
        OPENSSL_cleanse(prk, sizeof prk);
        OPENSSL_cleanse(t, sizeof t);
        return 1;
    }
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (c == NULL) return 0;
    unsigned char prk[EVP_MAX_MD_SIZE], t[EVP_MAX_MD_SIZE];
    int ok = kms_hmac_parts(c, md, bs, hs, salt, saltlen, key, keylen, NULL, 0, NULL, 0, prk);
    size_t done = 0, tlen = 0;
    for (unsigned char i = 1; ok && done < outlen; i++) {
        ok = kms_hmac_parts(c, md, bs, hs, prk, hs, t, tlen, info, infolen, &i, 1, t);
        tlen = hs;
        size_t take = outlen - done < hs ? outlen - done : hs;
        memcpy(out + done, t, take);
        done += take;
    }
    EVP_MD_CTX_free(c);
    OPENSSL_cleanse(prk, sizeof prk);
    OPENSSL_cleanse(t, sizeof t);
    if (!ok) OPENSSL_cleanse(out, outlen);
    return ok;
}

// One version-1 symmetric message (PROTOCOL.md §9) sealed or opened in one call, without a
// Swift allocation between the steps: the message key is HKDF-SHA256(version key, salt,
// label ‖ header) into `mk` (the caller's locked memory), then AES-256-GCM under it with the
// header's nonce and AAD = header ‖ canonical context (two AAD updates, nothing concatenated).
// `blob` starts with the 66-byte header (salt at 22, nonce at 54); sealing writes ciphertext
// and tag after it (the caller sized it 66 + ptlen + 16). Returns 1, or 0 on an OpenSSL failure
// (sealing) or a tag that does not verify (opening, which then zeroes `out`).
static inline int kms_v1_message_key(const unsigned char *vkey, size_t vkeylen,
                                     const unsigned char *label, size_t labellen,
                                     const unsigned char *header, unsigned char mk[32]) {
    unsigned char prk[32], one = 1;
    kms_hmac_sha256_parts(header + 22, 32, vkey, vkeylen, NULL, 0, NULL, 0, prk);
    kms_hmac_sha256_parts(prk, 32, label, labellen, header, 66, &one, 1, mk);
    OPENSSL_cleanse(prk, sizeof prk);
    return 1;
}

static inline int kms_v1_seal(const unsigned char *vkey, size_t vkeylen,
                              const unsigned char *label, size_t labellen,
                              const unsigned char *context, size_t contextlen,
                              const unsigned char *pt, size_t ptlen,
                              unsigned char *blob, unsigned char mk[32]) {
    kms_v1_message_key(vkey, vkeylen, label, labellen, blob, mk);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c == NULL) { OPENSSL_cleanse(mk, 32); return 0; }
    int n = 0;
    unsigned char scratch[16];
    int ok = EVP_EncryptInit_ex(c, kms_gcm256(), NULL, mk, blob + 54)
          && EVP_EncryptUpdate(c, NULL, &n, blob, 66)
          && (contextlen == 0 || EVP_EncryptUpdate(c, NULL, &n, context, (int)contextlen))
          && (ptlen == 0 || EVP_EncryptUpdate(c, blob + 66, &n, pt, (int)ptlen))
          && EVP_EncryptFinal_ex(c, scratch, &n)
          && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, blob + 66 + ptlen);
    EVP_CIPHER_CTX_free(c);
    OPENSSL_cleanse(mk, 32);
    if (!ok) ERR_clear_error();
    return ok;
}

static inline int kms_v1_open(const unsigned char *vkey, size_t vkeylen,
                              const unsigned char *label, size_t labellen,
                              const unsigned char *context, size_t contextlen,
                              const unsigned char *blob, size_t bloblen,
                              unsigned char *out, unsigned char mk[32]) {
    if (bloblen < 66 + 16) return 0;
    size_t ctlen = bloblen - 66 - 16;
    kms_v1_message_key(vkey, vkeylen, label, labellen, blob, mk);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c == NULL) { OPENSSL_cleanse(mk, 32); return 0; }
    int n = 0;
    unsigned char scratch[16], tag[16];
    memcpy(tag, blob + 66 + ctlen, 16);
    int ok = EVP_DecryptInit_ex(c, kms_gcm256(), NULL, mk, blob + 54)
          && EVP_DecryptUpdate(c, NULL, &n, blob, 66)
          && (contextlen == 0 || EVP_DecryptUpdate(c, NULL, &n, context, (int)contextlen))
          && (ctlen == 0 || EVP_DecryptUpdate(c, out, &n, blob + 66, (int)ctlen))
          && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tag)
          && EVP_DecryptFinal_ex(c, scratch, &n) == 1;
    EVP_CIPHER_CTX_free(c);
    OPENSSL_cleanse(mk, 32);
    if (!ok) {
        if (ctlen) OPENSSL_cleanse(out, ctlen);
        ERR_clear_error();
    }
    return ok;
}

// The same HKDF through OpenSSL's own EVP_KDF "HKDF" (fetched once; the digest named per
// call, as its API takes it): the reference kmsbench measures beside kmsd's, and a second
// implementation HKDFTests compares kmsd's with.
static inline EVP_KDF *kms_hkdf_alg(void) { KMS_CACHED_FETCH(EVP_KDF, EVP_KDF_fetch(NULL, "HKDF", NULL), EVP_KDF_free) }
static inline int kms_hkdf_evp_kdf(const char *digest,
                                   const unsigned char *key, size_t keylen,
                                   const unsigned char *salt, size_t saltlen,
                                   const unsigned char *info, size_t infolen,
                                   unsigned char *out, size_t outlen) {
    EVP_KDF *alg = kms_hkdf_alg();
    if (alg == NULL) return 0;
    EVP_KDF_CTX *ctx = EVP_KDF_CTX_new(alg);
    if (ctx == NULL) return 0;
    static unsigned char empty[1] = {0};
    OSSL_PARAM params[5];
    int n = 0;
    params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)digest, 0);
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, keylen ? (void *)key : (void *)empty, keylen);
    if (saltlen > 0)
        params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, saltlen);
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, infolen ? (void *)info : (void *)empty, infolen);
    params[n] = OSSL_PARAM_construct_end();
    int ok = EVP_KDF_derive(ctx, out, outlen, params);
    EVP_KDF_CTX_free(ctx);
    return ok;
}

// HMAC with SHA-256/384/512 through EVP_MAC.
static inline int kms_hmac_compute(const char *digest,
                                   const unsigned char *key, size_t keylen,
                                   const unsigned char *data, size_t datalen,
                                   unsigned char *out, size_t outcap, size_t *outlen) {
    // SHA-256 (every audit record's chain link, every key row's MAC) on the block functions:
    // EVP_MAC's context and digest fetch cost several times the hashing here.
    if (strcmp(digest, "SHA256") == 0) {
        if (outcap < 32) return 0;
        kms_hmac_sha256_parts(key, keylen, data, datalen, NULL, 0, NULL, 0, out);
        *outlen = 32;
        return 1;
    }
    EVP_MAC *alg = kms_hmac_alg();
    if (alg == NULL) return 0;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(alg);
    if (ctx == NULL) return 0;
    static unsigned char empty[1] = {0};
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)digest, 0);
    params[1] = OSSL_PARAM_construct_end();
    int ok = EVP_MAC_init(ctx, keylen ? key : empty, keylen, params)
          && EVP_MAC_update(ctx, datalen ? data : empty, datalen)
          && EVP_MAC_final(ctx, out, outlen, outcap);
    EVP_MAC_CTX_free(ctx);
    return ok;
}

// A keyed HMAC context for many MACs under one key in a row (a startup scan): keyed once,
// then each MAC re-initialises it with the same key (EVP_MAC_init with a NULL key).
static inline EVP_MAC_CTX *kms_hmac_keyed_new(const char *digest, const unsigned char *key, size_t keylen) {
    EVP_MAC *alg = kms_hmac_alg();
    if (alg == NULL) return NULL;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(alg);
    if (ctx == NULL) return NULL;
    static unsigned char empty[1] = {0};
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)digest, 0);
    params[1] = OSSL_PARAM_construct_end();
    if (!EVP_MAC_init(ctx, keylen ? key : empty, keylen, params)) { EVP_MAC_CTX_free(ctx); return NULL; }
    return ctx;
}
static inline int kms_hmac_keyed_compute(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen,
                                         unsigned char *out, size_t outcap, size_t *outlen) {
    static unsigned char empty[1] = {0};
    return EVP_MAC_init(ctx, NULL, 0, NULL)
        && EVP_MAC_update(ctx, datalen ? data : empty, datalen)
        && EVP_MAC_final(ctx, out, outlen, outcap);
}

// RSA key pairs for wrapping imported key material (GetParametersForImport). The private parts
// live in OpenSSL's secure heap when kmsd has initialised it (kms_secure_heap_init): locked and
// zeroed on release.
static inline int kms_secure_heap_init(size_t size) {
    return CRYPTO_secure_malloc_initialized() ? 1 : CRYPTO_secure_malloc_init(size, 32);
}
static inline size_t kms_secure_heap_used(void) { return CRYPTO_secure_used(); }
static inline int kms_secure_heap_initialized(void) { return CRYPTO_secure_malloc_initialized(); }

static inline EVP_PKEY *kms_rsa_generate(int bits) {
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    if (ctx == NULL) return NULL;
    EVP_PKEY *pkey = NULL;
    if (EVP_PKEY_keygen_init(ctx) <= 0 || EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, bits) <= 0
        || EVP_PKEY_generate(ctx, &pkey) <= 0) {
        pkey = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    return pkey;
}

// DER SubjectPublicKeyInfo into a buffer the caller frees with kms_openssl_free; its length, or <= 0.
static inline int kms_public_key_der(EVP_PKEY *pkey, unsigned char **out) {
    *out = NULL;
    return i2d_PUBKEY(pkey, out);
}
static inline void kms_openssl_free(void *p) { OPENSSL_free(p); }
static inline EVP_PKEY *kms_private_key_from_der(const unsigned char *der, long len) {
    const unsigned char *p = der;
    return d2i_AutoPrivateKey(NULL, &p, len);
}
static inline EVP_PKEY *kms_public_key_from_der(const unsigned char *der, long len) {
    const unsigned char *p = der;
    EVP_PKEY *k = d2i_PUBKEY(NULL, &p, len);
    if (k != NULL && p != der + len) { EVP_PKEY_free(k); return NULL; }  // trailing bytes
    return k;
}
static inline int kms_pkey_is_rsa(EVP_PKEY *pkey) { return EVP_PKEY_is_a(pkey, "RSA"); }

// RSAES-OAEP with MGF1 over the same digest ("SHA1" or "SHA256") and an empty label.
// `out` must hold EVP_PKEY_get_size(pkey) bytes; *outlen is its capacity in, the length out.
static inline int kms_rsa_oaep(int encrypt, EVP_PKEY *pkey, const char *md,
                               const unsigned char *in, size_t inlen, unsigned char *out, size_t *outlen) {
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    if (ctx == NULL) return 0;
    int ok = (encrypt ? EVP_PKEY_encrypt_init(ctx) : EVP_PKEY_decrypt_init(ctx)) > 0
          && EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) > 0
          && EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx, md, NULL) > 0
          && EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx, md, NULL) > 0
          && (encrypt ? EVP_PKEY_encrypt(ctx, out, outlen, in, inlen)
                      : EVP_PKEY_decrypt(ctx, out, outlen, in, inlen)) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}
static inline const char *kms_md_sha1(void) { return "SHA1"; }
static inline const char *kms_md_sha256(void) { return "SHA256"; }

// AES key wrap with padding (RFC 5649) under a 16, 24 or 32-byte key. Wrapping needs
// inlen + 16 bytes of room; unwrapping inlen.
static inline int kms_aes_wrap_pad(int encrypt, const unsigned char *key, size_t keylen,
                                   const unsigned char *in, size_t inlen,
                                   unsigned char *out, size_t outcap, size_t *outlen) {
    const EVP_CIPHER *c = keylen == 16 ? EVP_aes_128_wrap_pad()
                        : keylen == 24 ? EVP_aes_192_wrap_pad()
                        : keylen == 32 ? EVP_aes_256_wrap_pad() : NULL;
    if (c == NULL || inlen > 0x7fffffff || outcap < (encrypt ? inlen + 16 : inlen)) return 0;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) return 0;
    EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    int len = 0, fin = 0;
    int ok = EVP_CipherInit_ex(ctx, c, NULL, key, NULL, encrypt) == 1
          && EVP_CipherUpdate(ctx, out, &len, in, (int)inlen) == 1 && len >= 0
          && EVP_CipherFinal_ex(ctx, out + len, &fin) == 1;
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) return 0;
    *outlen = (size_t)len + (size_t)fin;
    return 1;
}

// X25519 (key agreement) and Ed25519 (signatures) with raw 32-byte keys: replication identities.
// Private keys live in OpenSSL's secure heap once kms_secure_heap_init ran (ECX keys are
// allocated there); callers pass them in from locked memory and free the EVP_PKEY right after.
static inline int kms_ecx_nid(int ed) { return ed ? EVP_PKEY_ED25519 : EVP_PKEY_X25519; }
// A new key pair: its raw private and public keys into priv[32], pub[32].
static inline int kms_ecx_generate(int ed, unsigned char *priv, unsigned char *pub) {
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(kms_ecx_nid(ed), NULL);
    EVP_PKEY *pkey = NULL;
    size_t plen = 32, qlen = 32;
    int ok = ctx != NULL && EVP_PKEY_keygen_init(ctx) > 0 && EVP_PKEY_keygen(ctx, &pkey) > 0
        && EVP_PKEY_get_raw_private_key(pkey, priv, &plen) > 0 && plen == 32
        && EVP_PKEY_get_raw_public_key(pkey, pub, &qlen) > 0 && qlen == 32;
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    return ok;
}
// The public key of a raw private key.
static inline int kms_ecx_public(int ed, const unsigned char *priv, unsigned char *pub) {
    EVP_PKEY *pkey = EVP_PKEY_new_raw_private_key(kms_ecx_nid(ed), NULL, priv, 32);
    size_t qlen = 32;
    int ok = pkey != NULL && EVP_PKEY_get_raw_public_key(pkey, pub, &qlen) > 0 && qlen == 32;
    EVP_PKEY_free(pkey);
    return ok;
}
// X25519(priv, peer) into shared[32]; fails for a low-order peer key (all-zero result).
static inline int kms_x25519(const unsigned char *priv, const unsigned char *peer, unsigned char *shared) {
    EVP_PKEY *mine = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, priv, 32);
    EVP_PKEY *theirs = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer, 32);
    EVP_PKEY_CTX *ctx = mine ? EVP_PKEY_CTX_new(mine, NULL) : NULL;
    size_t len = 32;
    int ok = ctx != NULL && theirs != NULL && EVP_PKEY_derive_init(ctx) > 0
        && EVP_PKEY_derive_set_peer(ctx, theirs) > 0 && EVP_PKEY_derive(ctx, shared, &len) > 0 && len == 32;
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(theirs);
    EVP_PKEY_free(mine);
    return ok;
}
static inline int kms_ed25519_sign(const unsigned char *priv, const unsigned char *msg, size_t msglen, unsigned char *sig) {
    EVP_PKEY *pkey = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, priv, 32);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    size_t siglen = 64;
    int ok = pkey != NULL && ctx != NULL && EVP_DigestSignInit(ctx, NULL, NULL, NULL, pkey) > 0
        && EVP_DigestSign(ctx, sig, &siglen, msg, msglen) > 0 && siglen == 64;
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(pkey);
    return ok;
}
static inline int kms_ed25519_verify(const unsigned char *pub, const unsigned char *msg, size_t msglen,
                                     const unsigned char *sig, size_t siglen) {
    EVP_PKEY *pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pub, 32);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = pkey != NULL && ctx != NULL && EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, pkey) > 0
        && EVP_DigestVerify(ctx, sig, siglen, msg, msglen) == 1;
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(pkey);
    ERR_clear_error();
    return ok;
}
