/* chunkpool._native: read and decode a batch of local chunks without the GIL.
 *
 * Why: on small chunks (128², 256²) the pool is bound by the GIL, not by its cores.
 * Read in Python, every chunk costs an open, an fstat, a pread, a close and a decode
 * call, each of which hands the GIL over and takes it back, with Python between them:
 * two threads doing this run little faster than one. Here a thread reads and decodes
 * a whole batch of chunks in one call that holds no GIL from the first open to the last
 * decode, so two threads use two cores.
 *
 * What it does is deliberately narrow (chunkpool/native.py decides when it applies):
 * for each item, open a file (O_NOFOLLOW: never a link; a link, and every other
 * surprise, is left to the Python path; the file stays open for the next item that
 * names it by the same path object: a shard's inner chunks), take its size and mtime
 * (once per open), read the whole file
 * or a byte range of it, and either decode it with libzstd into the item's buffer,
 * which it must fill exactly, or (no decoder) read it straight into that buffer, whose
 * size it must have exactly. An item that does not end exactly so reports FALLBACK and
 * its buffer's contents are undefined: the caller reads that chunk again the Python
 * way, which says what is wrong. libzstd's functions are passed in as addresses (the
 * ones chunkpool.frames loads through cffi), so nothing here links to libzstd.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef size_t (*decompress_fn)(void *, void *, size_t, const void *, size_t);
typedef unsigned (*is_error_fn)(size_t);

enum { DONE = 0, MISSING = 1, FALLBACK = 2 };

/* The largest encoded chunk read here; larger ones take the Python path. */
#define MAX_READ ((long long)1 << 30)

typedef struct {
    PyObject *path_object; /* a reference held while the GIL is released */
    const char *path;
    long long offset; /* -1: the whole file */
    long long length;
    char *out;
    Py_ssize_t out_len;
    int status;
    long long size, mtime_ns, nread, fetched_ns, decoded_ns;
} item_t;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Read up to len bytes at off; the count read, or -1 (errno set). */
static long long read_at(int fd, char *buf, long long len, long long off) {
    long long done = 0;
    while (done < len) {
        ssize_t got = pread(fd, buf + done, (size_t)(len - done), (off_t)(off + done));
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (got == 0) break;
        done += got;
    }
    return done;
}

/* The file the item before read, kept open for the next item of the same path object
   (the inner chunks of one shard): its descriptor and stamp. */
typedef struct {
    PyObject *path_object;
    int fd;
    long long size, mtime_ns;
} open_file_t;

static void close_file(open_file_t *f) {
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    f->path_object = NULL;
}

/* Open (or keep) x's file in f; 0, or -1 with x->status set. */
static int open_file(item_t *x, open_file_t *f) {
    if (f->fd >= 0 && f->path_object == x->path_object) return 0;
    close_file(f);
    /* O_NONBLOCK: a FIFO in a chunk's place does not block the open (reads of
       regular files ignore it); it is then not a regular file, left to Python */
    int fd = open(x->path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR) x->status = MISSING;
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return -1;
    }
    f->fd = fd;
    f->path_object = x->path_object;
    f->size = (long long)st.st_size;
    f->mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    return 0;
}

static void run_item(item_t *x, void *dctx, decompress_fn decompress, is_error_fn is_error,
                     char **scratch, long long *capacity, open_file_t *file) {
    x->status = FALLBACK;
    if (x->path == NULL) return;
    if (open_file(x, file) < 0) return;
    x->size = file->size;
    x->mtime_ns = file->mtime_ns;
    long long offset = x->offset < 0 ? 0 : x->offset;
    long long length = x->offset < 0 ? x->size : x->length;
    if (length < 0 || length > MAX_READ) return;
    char *target;
    if (decompress == NULL) { /* raw bytes: exactly the buffer's size, read into it */
        if (length != x->out_len) return;
        target = x->out;
    } else {
        if (length > *capacity) {
            free(*scratch);
            *capacity = 0;
            *scratch = malloc(length > 0 ? (size_t)length : 1);
            if (*scratch == NULL) return;
            *capacity = length;
        }
        target = *scratch;
    }
    x->nread = read_at(file->fd, target, length, offset);
    x->fetched_ns = now_ns();
    if (x->nread != length) return;
    if (decompress == NULL) {
        x->decoded_ns = x->fetched_ns;
        x->status = DONE;
        return;
    }
    size_t got = decompress(dctx, x->out, (size_t)x->out_len, target, (size_t)length);
    x->decoded_ns = now_ns();
    if (!is_error(got) && got == (size_t)x->out_len) x->status = DONE;
}

PyDoc_STRVAR(read_chunks_doc,
"read_chunks(items, dctx, decompress, is_error) -> list of results\n\n"
"items: (path: bytes, offset: int (-1: whole file), length: int, out: writable buffer).\n"
"dctx, decompress, is_error: addresses of a ZSTD_DCtx, ZSTD_decompressDCtx and\n"
"ZSTD_isError; decompress 0: raw bytes. Each result: (status, size, mtime_ns, nread,\n"
"fetched_ns, decoded_ns), status 0 done, 1 no such file, 2 read it the Python way;\n"
"times are CLOCK_MONOTONIC nanoseconds. The GIL is released throughout.");

static PyObject *read_chunks(PyObject *self, PyObject *args) {
    PyObject *items;
    unsigned long long dctx, decompress, is_error;
    if (!PyArg_ParseTuple(args, "OKKK", &items, &dctx, &decompress, &is_error)) return NULL;
    if (decompress != 0 && (dctx == 0 || is_error == 0)) {
        PyErr_SetString(PyExc_ValueError, "a decompress function needs a context and is_error");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(items, "items must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    item_t *it = PyMem_Calloc(n > 0 ? n : 1, sizeof(item_t));
    Py_buffer *views = PyMem_Calloc(n > 0 ? n : 1, sizeof(Py_buffer));
    PyObject *results = NULL;
    Py_ssize_t held = 0;
    if (it == NULL || views == NULL) {
        PyErr_NoMemory();
        goto end;
    }
    for (; held < n; held++) {
        PyObject *path, *out;
        item_t *x = &it[held];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, held), "SLLO;an item is "
                              "(path, offset, length, out)", &path, &x->offset, &x->length, &out))
            goto end;
        Py_INCREF(path);
        x->path_object = path;
        x->path = PyBytes_AS_STRING(path);
        if ((Py_ssize_t)strlen(x->path) != PyBytes_GET_SIZE(path)) x->path = NULL; /* NUL */
        if (PyObject_GetBuffer(out, &views[held], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto end;
        x->out = views[held].buf;
        x->out_len = views[held].len;
    }
    Py_BEGIN_ALLOW_THREADS
    char *scratch = NULL;
    long long capacity = 0;
    open_file_t file = {NULL, -1, 0, 0};
    for (Py_ssize_t i = 0; i < n; i++)
        run_item(&it[i], (void *)(uintptr_t)dctx, (decompress_fn)(uintptr_t)decompress,
                 (is_error_fn)(uintptr_t)is_error, &scratch, &capacity, &file);
    close_file(&file);
    free(scratch);
    Py_END_ALLOW_THREADS
    results = PyList_New(n);
    for (Py_ssize_t i = 0; results != NULL && i < n; i++) {
        item_t *x = &it[i];
        PyObject *r = Py_BuildValue("(iLLLLL)", x->status, x->size, x->mtime_ns, x->nread,
                                    x->fetched_ns, x->decoded_ns);
        if (r == NULL) Py_CLEAR(results);
        else PyList_SET_ITEM(results, i, r);
    }
end:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    for (Py_ssize_t i = 0; it != NULL && i < n; i++) Py_XDECREF(it[i].path_object);
    PyMem_Free(it);
    PyMem_Free(views);
    Py_DECREF(seq);
    return results;
}

PyDoc_STRVAR(monotonic_ns_doc, "monotonic_ns() -> int: CLOCK_MONOTONIC now, in nanoseconds.");

static PyObject *monotonic_ns(PyObject *self, PyObject *unused) {
    return PyLong_FromLongLong(now_ns());
}

static PyMethodDef methods[] = {
    {"read_chunks", read_chunks, METH_VARARGS, read_chunks_doc},
    {"monotonic_ns", monotonic_ns, METH_NOARGS, monotonic_ns_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "chunkpool._native",
    "Reading and decoding a batch of local chunks without the GIL (see _native.c).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
