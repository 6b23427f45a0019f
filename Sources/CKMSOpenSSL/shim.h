#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/err.h>
#include <openssl/crypto.h>

// OSSL_PARAM keeps the pointers it is given: these names must be static C strings, never
// temporaries bridged from Swift Strings (see PITFALLS.md).
static inline const char *kms_name_digest(void) { return OSSL_KDF_PARAM_DIGEST; }
static inline const char *kms_name_key(void) { return OSSL_KDF_PARAM_KEY; }
static inline const char *kms_name_salt(void) { return OSSL_KDF_PARAM_SALT; }
static inline const char *kms_name_info(void) { return OSSL_KDF_PARAM_INFO; }
static inline const char *kms_name_mac_digest(void) { return OSSL_MAC_PARAM_DIGEST; }
static inline const char *kms_sha256(void) { return "SHA256"; }
static inline const char *kms_sha384(void) { return "SHA384"; }
static inline const char *kms_sha512(void) { return "SHA512"; }
static inline const char *kms_hkdf(void) { return "HKDF"; }
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

// HKDF (RFC 5869, extract-and-expand) with SHA-256/384/512; all params built here so every
// pointer outlives EVP_KDF_derive.
static inline int kms_hkdf_derive(const char *digest,
                                  const unsigned char *key, size_t keylen,
                                  const unsigned char *salt, size_t saltlen,
                                  const unsigned char *info, size_t infolen,
                                  unsigned char *out, size_t outlen) {
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    if (kdf == NULL) return 0;
    EVP_KDF_CTX *ctx = EVP_KDF_CTX_new(kdf);
    EVP_KDF_free(kdf);
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
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL) return 0;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac);
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
