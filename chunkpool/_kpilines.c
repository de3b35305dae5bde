/* chunkpool._kpilines: the KPI log's load records formatted as JSON lines, in C.
 *
 * Why: the KPI writer process (chunkpool/kpiwriter.py) formats every load record the
 * pool finishes. In Python that is about 3 us a record (a dict, five float-to-int
 * conversions, orjson), which on a machine whose cores the loading threads keep busy
 * is taken from them: at 128² chunks, about 4% of the pool's throughput. Here one call
 * formats a run of records (the columns the writer receives) in a fraction of that.
 *
 * The lines are byte for byte those of the Python formatter (orjson's output for the
 * record's dict): strings escaped as orjson does (", \, and control characters; other
 * characters as UTF-8), integers in decimal, times as the epoch's microseconds plus
 * int(seconds * 1e6), None as null. Anything outside that narrow set of types (a bool,
 * a numpy scalar, a str with surrogates...) raises TypeError, and the writer formats
 * that run in Python instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} buf_t;

static int reserve(buf_t *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put(buf_t *b, const char *s, Py_ssize_t n) {
    if (reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

#define PUT_LITERAL(b, s) put((b), (s), (Py_ssize_t)sizeof(s) - 1)

static int put_long(buf_t *b, long long v) {
    char digits[24];
    char *end = digits + sizeof digits, *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--p = '-';
    return put(b, p, end - p);
}

static int wrong_type(const char *what, PyObject *value) {
    PyErr_Format(PyExc_TypeError, "%s: not formatted here: %s", what, Py_TYPE(value)->tp_name);
    return -1;
}

/* An exact int, in decimal. */
static int put_int(buf_t *b, PyObject *value, const char *what) {
    if (!PyLong_CheckExact(value)) return wrong_type(what, value);
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) return -1;
    return put_long(b, v);
}

/* A str as orjson writes it (or None as null). */
static int put_str(buf_t *b, PyObject *value, const char *what) {
    static const char hex[] = "0123456789abcdef";
    if (value == Py_None) return PUT_LITERAL(b, "null");
    if (!PyUnicode_CheckExact(value)) return wrong_type(what, value);
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(value, &n); /* fails on lone surrogates */
    if (s == NULL) return -1;
    if (reserve(b, 6 * n + 2) < 0) return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            *out++ = '\\';
            *out++ = (char)c;
        } else if (c >= 0x20) {
            *out++ = (char)c;
        } else {
            *out++ = '\\';
            switch (c) {
            case '\b': *out++ = 'b'; break;
            case '\t': *out++ = 't'; break;
            case '\n': *out++ = 'n'; break;
            case '\f': *out++ = 'f'; break;
            case '\r': *out++ = 'r'; break;
            default:
                *out++ = 'u';
                *out++ = '0';
                *out++ = '0';
                *out++ = hex[c >> 4];
                *out++ = hex[c & 15];
            }
        }
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

/* A perf_counter time as the epoch's microseconds (or None as null). */
static int put_time(buf_t *b, PyObject *value, long long epoch_us, const char *what) {
    if (value == Py_None) return PUT_LITERAL(b, "null");
    if (!PyFloat_CheckExact(value)) return wrong_type(what, value);
    return put_long(b, epoch_us + (long long)(PyFloat_AS_DOUBLE(value) * 1e6));
}

/* A tuple of exact ints as a JSON array. */
static int put_index(buf_t *b, PyObject *value) {
    if (!PyTuple_CheckExact(value)) return wrong_type("index", value);
    if (PUT_LITERAL(b, "[") < 0) return -1;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(value); k++) {
        if (k && PUT_LITERAL(b, ",") < 0) return -1;
        if (put_int(b, PyTuple_GET_ITEM(value, k), "index") < 0) return -1;
    }
    return PUT_LITERAL(b, "]");
}

enum {
    SOURCE, LEVEL, INDEX, STATE, BYTES_FETCHED, BYTES_DECODED,
    REQUESTED, FETCH_STARTED, FETCHED, DECODED, DELIVERED, ERROR, FIELDS
};

/* Keys in the order of the record's fields, each with the text before its value. */
static const char *const key[FIELDS] = {
    "{\"event\":\"load\",\"source\":", ",\"level\":", ",\"index\":", ",\"state\":",
    ",\"bytes_fetched\":", ",\"bytes_decoded\":", ",\"requested\":", ",\"fetch_started\":",
    ",\"fetched\":", ",\"decoded\":", ",\"delivered\":", ",\"error\":",
};
static const char *const name[FIELDS] = {
    "source", "level", "index", "state", "bytes_fetched", "bytes_decoded",
    "requested", "fetch_started", "fetched", "decoded", "delivered", "error",
};

static int put_record(buf_t *b, PyObject *const *column, Py_ssize_t i, long long epoch_us) {
    for (int f = 0; f < FIELDS; f++) {
        if (put(b, key[f], (Py_ssize_t)strlen(key[f])) < 0) return -1;
        PyObject *v = PySequence_Fast_GET_ITEM(column[f], i);
        int rc;
        switch (f) {
        case SOURCE: case STATE: case ERROR: rc = put_str(b, v, name[f]); break;
        case INDEX: rc = put_index(b, v); break;
        case LEVEL: case BYTES_FETCHED: case BYTES_DECODED: rc = put_int(b, v, name[f]); break;
        default: rc = put_time(b, v, epoch_us, name[f]);
        }
        if (rc < 0) return -1;
    }
    return PUT_LITERAL(b, "}");
}

PyDoc_STRVAR(load_lines_doc,
"load_lines(epoch_us, columns) -> bytes\n\n"
"The load records given as their 12 columns (sequences of equal length, in the order\n"
"of chunkpool.kpi.LoadRecord's fields), one JSON line each, joined by newlines (no\n"
"newline after the last). TypeError for a value of a type not formatted here.");

static PyObject *load_lines(PyObject *Py_UNUSED(self), PyObject *args) {
    long long epoch_us;
    PyObject *columns;
    if (!PyArg_ParseTuple(args, "LO", &epoch_us, &columns)) return NULL;
    PyObject *cols = PySequence_Fast(columns, "columns must be a sequence");
    if (cols == NULL) return NULL;
    PyObject *column[FIELDS] = {NULL};
    PyObject *result = NULL;
    buf_t b = {NULL, 0, 0};
    Py_ssize_t n = 0;
    if (PySequence_Fast_GET_SIZE(cols) != FIELDS) {
        PyErr_Format(PyExc_ValueError, "expected %d columns, got %zd", FIELDS,
                     PySequence_Fast_GET_SIZE(cols));
        goto end;
    }
    for (int f = 0; f < FIELDS; f++) {
        column[f] = PySequence_Fast(PySequence_Fast_GET_ITEM(cols, f), "a column must be a sequence");
        if (column[f] == NULL) goto end;
        Py_ssize_t len = PySequence_Fast_GET_SIZE(column[f]);
        if (f == 0) n = len;
        else if (len != n) {
            PyErr_Format(PyExc_ValueError, "column %s has %zd values, not %zd", name[f], len, n);
            goto end;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && PUT_LITERAL(&b, "\n") < 0) goto end;
        if (put_record(&b, column, i, epoch_us) < 0) goto end;
    }
    result = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
end:
    for (int f = 0; f < FIELDS; f++) Py_XDECREF(column[f]);
    Py_DECREF(cols);
    PyMem_Free(b.data);
    return result;
}

static PyMethodDef methods[] = {
    {"load_lines", load_lines, METH_VARARGS, load_lines_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "chunkpool._kpilines",
    "The KPI log's load records as JSON lines (see _kpilines.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__kpilines(void) { return PyModule_Create(&module); }
