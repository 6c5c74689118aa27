#ifndef TALKMESH_SHIM_H
#define TALKMESH_SHIM_H

#include <sys/types.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/select.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
#include <string.h>
#include <pthread.h>
#include <time.h>

#include <event2/event.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/listener.h>
#include <event2/thread.h>
#include <event2/util.h>

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <openssl/rand.h>
#include <openssl/crypto.h>
#include <openssl/x509.h>

#include <nghttp2/nghttp2.h>
#include <http_parser.h>

#include <libdeflate.h>
#include <libavformat/avformat.h>
#include <libavformat/avio.h>
#include <libavcodec/avcodec.h>
#include <libavutil/avutil.h>
#include <libavutil/audio_fifo.h>
#include <libavutil/pixdesc.h>
#include <libavutil/channel_layout.h>
#include <libavutil/error.h>
#include <libavutil/imgutils.h>
#include <libavutil/opt.h>
#include <libavutil/samplefmt.h>
#include <libavutil/timestamp.h>
#include <libswscale/swscale.h>
#include <libswresample/swresample.h>

#include <curl/curl.h>
#include <sqlite3.h>
#include <postgresql/libpq-fe.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/wait.h>

/* Macros Swift cannot import, as inline functions. */
static inline int tm_averror(int e) { return AVERROR(e); }
static inline int tm_averror_eof(void) { return AVERROR_EOF; }
static inline long tm_ssl_ctx_set_min_tls12(SSL_CTX *ctx) { return SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION); }
static inline long tm_ssl_ctx_set_mode_release_buffers(SSL_CTX *ctx) { return SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS); }

static inline long tm_ssl_set_sni(SSL *ssl, const char *name) { return SSL_set_tlsext_host_name(ssl, name); }

/* libcurl's setopt functions are variadic, which Swift cannot call. */
static inline CURLcode tm_curl_easy_setopt_long(CURL *c, CURLoption o, long v) { return curl_easy_setopt(c, o, v); }
static inline CURLcode tm_curl_easy_setopt_ptr(CURL *c, CURLoption o, void *v) { return curl_easy_setopt(c, o, v); }
static inline CURLcode tm_curl_easy_setopt_str(CURL *c, CURLoption o, const char *v) { return curl_easy_setopt(c, o, v); }
static inline CURLcode tm_curl_easy_setopt_off(CURL *c, CURLoption o, curl_off_t v) { return curl_easy_setopt(c, o, v); }
typedef size_t (*tm_curl_write_callback)(char *, size_t, size_t, void *);
static inline CURLcode tm_curl_easy_setopt_write(CURL *c, CURLoption o, tm_curl_write_callback f) { return curl_easy_setopt(c, o, f); }
typedef int (*tm_curl_prereq_callback)(void *, char *, char *, int, int);
static inline CURLcode tm_curl_easy_setopt_prereq(CURL *c, tm_curl_prereq_callback f) { return curl_easy_setopt(c, CURLOPT_PREREQFUNCTION, f); }
static inline CURLcode tm_curl_easy_getinfo_long(CURL *c, CURLINFO i, long *v) { return curl_easy_getinfo(c, i, v); }
static inline CURLcode tm_curl_easy_getinfo_ptr(CURL *c, CURLINFO i, void **v) { return curl_easy_getinfo(c, i, v); }
static inline CURLMcode tm_curl_multi_setopt_long(CURLM *m, CURLMoption o, long v) { return curl_multi_setopt(m, o, v); }

/* fork + exec of a supervised child (`talkmesh up`): its own process group, so a terminal's
   Ctrl-C reaches only the supervisor, which stops the children in order; SIGTERM when the
   supervisor dies, so no child outlives it; stdout and stderr into `out`; signal dispositions
   and mask reset. Only async-signal-safe calls run between fork and exec. */
static inline pid_t tm_spawn_supervised(const char *path, char *const argv[], char *const envp[], int out) {
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0) return pid;
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);
    for (int signo = 1; signo < 32; signo++) {
        if (signo != SIGKILL && signo != SIGSTOP) signal(signo, SIG_DFL);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    dup2(out, 1);
    dup2(out, 2);
    execve(path, argv, envp);
    _exit(127);
}
static inline int tm_wifexited(int status) { return WIFEXITED(status); }
static inline int tm_wexitstatus(int status) { return WEXITSTATUS(status); }
static inline int tm_wtermsig(int status) { return WTERMSIG(status); }

/* Trace and span ids: unique, not secret. SplitMix64 over a per-thread state seeded once per
   thread from getrandom(), so an id costs no system call and no atomic that every core's
   requests would contend on. */
#include <stdint.h>
#include <sys/random.h>
static inline uint64_t tm_next_id(void) {
    static __thread uint64_t state;
    static __thread int seeded;
    if (__builtin_expect(!seeded, 0)) {
        if (getrandom(&state, sizeof state, 0) != (ssize_t)sizeof state) state = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)&state << 16) ^ (uint64_t)getpid();
        seeded = 1;
    }
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* libFuzzer's driver, for a program with its own main (`talkmesh-fuzz`). Declared only: it is
   linked, and called, in the fuzzing build alone (scripts/fuzz). */
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

#endif
