// A small .npy reader/writer (NumPy format 1.0/2.0, little-endian, C order) and the host tensor the
// examples pass around. dtypes: float32, float16, bfloat16 (ml_dtypes saves it as '<V2'), int64.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cm_example
{

// Bad input from the user (a file, an argument, a tensor): one line, exit status 2.
struct InputError : std::runtime_error
{
    using std::runtime_error::runtime_error;
};

struct Tensor
{
    std::string name;
    std::string dtype; // "float32" | "float16" | "bfloat16" | "int64"
    std::vector<int64_t> shape;
    std::vector<uint8_t> data;

    static size_t itemSize(std::string const& dtype)
    {
        if (dtype == "float32")
            return 4;
        if (dtype == "int64")
            return 8;
        if (dtype == "float16" || dtype == "bfloat16")
            return 2;
        throw InputError("unsupported dtype " + dtype);
    }
    int64_t count() const
    {
        int64_t n = 1;
        for (int64_t d : shape)
            n *= d;
        return n;
    }
    static Tensor zeros(std::string name, std::string dtype, std::vector<int64_t> shape)
    {
        Tensor t{std::move(name), std::move(dtype), std::move(shape), {}};
        t.data.assign(static_cast<size_t>(t.count()) * itemSize(t.dtype), 0);
        return t;
    }
    std::string shapeString() const
    {
        std::ostringstream s;
        s << "(";
        for (size_t i = 0; i < shape.size(); ++i)
            s << (i ? ", " : "") << shape[i];
        s << (shape.size() == 1 ? ",)" : ")");
        return s.str();
    }
    // Steps [t0, t0 + T) of axis 1 (a chunk of a (batch, L, ...) tensor).
    Tensor sliceAxis1(int64_t t0, int64_t T) const
    {
        int64_t const b = shape.at(0), L = shape.at(1);
        int64_t inner = 1;
        for (size_t i = 2; i < shape.size(); ++i)
            inner *= shape[i];
        size_t const row = static_cast<size_t>(inner) * itemSize(dtype);
        Tensor out{name, dtype, shape, {}};
        out.shape[1] = T;
        out.data.resize(static_cast<size_t>(b * T) * row);
        for (int64_t i = 0; i < b; ++i)
            std::memcpy(out.data.data() + static_cast<size_t>(i * T) * row,
                data.data() + static_cast<size_t>(i * L + t0) * row, static_cast<size_t>(T) * row);
        return out;
    }
    int64_t const* i64() const { return reinterpret_cast<int64_t const*>(data.data()); }
    int64_t* i64() { return reinterpret_cast<int64_t*>(data.data()); }
};

inline float halfBitsToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0)
    {
        float v = static_cast<float>(m) / 16777216.0f;
        return sign ? -v : v;
    }
    bits = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112u) << 23) | (m << 13));
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Element i as a double (for printing).
inline double valueAt(Tensor const& t, int64_t i)
{
    uint8_t const* p = t.data.data();
    if (t.dtype == "float32")
    {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        return f;
    }
    if (t.dtype == "int64")
        return static_cast<double>(t.i64()[i]);
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    if (t.dtype == "float16")
        return halfBitsToFloat(h);
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline Tensor loadNpy(std::string const& path, std::string const& name)
{
    std::ifstream f(path, std::ios::binary);
    if (!f)
        throw InputError(path + ": cannot open");
    char magic[8];
    if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
        throw InputError(path + ": not a .npy file");
    uint32_t hlen = 0;
    if (magic[6] == 1)
    {
        uint8_t b[2];
        f.read(reinterpret_cast<char*>(b), 2);
        hlen = b[0] | (b[1] << 8);
    }
    else
    {
        uint8_t b[4];
        f.read(reinterpret_cast<char*>(b), 4);
        hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    }
    std::string header(hlen, '\0');
    if (!f.read(&header[0], hlen))
        throw InputError(path + ": truncated header");
    auto field = [&](char const* key) {
        size_t k = header.find(key);
        if (k == std::string::npos)
            throw InputError(path + ": header lacks " + key);
        return header.substr(header.find(':', k) + 1);
    };
    std::string descr = field("'descr'");
    descr = descr.substr(descr.find('\'') + 1);
    descr = descr.substr(0, descr.find('\''));
    Tensor t;
    t.name = name;
    if (descr == "<f4")
        t.dtype = "float32";
    else if (descr == "<f2")
        t.dtype = "float16";
    else if (descr == "<V2" || descr == "|V2" || descr == "<u2")
        t.dtype = "bfloat16";
    else if (descr == "<i8")
        t.dtype = "int64";
    else
        throw InputError(path + ": dtype " + descr + " is not float32, float16, bfloat16 or int64");
    if (field("'fortran_order'").find("True") < field("'fortran_order'").find(','))
        throw InputError(path + ": Fortran-ordered arrays are not supported");
    std::string sh = field("'shape'");
    sh = sh.substr(sh.find('(') + 1, sh.find(')') - sh.find('(') - 1);
    std::stringstream ss(sh);
    std::string item;
    while (std::getline(ss, item, ','))
    {
        if (item.find_first_of("0123456789") != std::string::npos)
            t.shape.push_back(std::stoll(item));
    }
    t.data.resize(static_cast<size_t>(t.count()) * Tensor::itemSize(t.dtype));
    if (!f.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(t.data.size())))
        throw InputError(path + ": truncated data (" + std::to_string(t.data.size()) + " bytes expected)");
    return t;
}

inline void saveNpy(std::string const& path, Tensor const& t)
{
    std::string descr = t.dtype == "float32" ? "<f4" : t.dtype == "float16" ? "<f2" : t.dtype == "int64" ? "<i8" : "<V2";
    std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (";
    for (size_t i = 0; i < t.shape.size(); ++i)
        header += std::to_string(t.shape[i]) + (t.shape.size() == 1 || i + 1 < t.shape.size() ? ", " : "");
    header += "), }";
    while ((10 + header.size() + 1) % 64 != 0)
        header += ' ';
    header += '\n';
    std::string const tmp = path + ".tmp";
    {
        std::ofstream f(tmp, std::ios::binary);
        uint16_t const hl = static_cast<uint16_t>(header.size());
        f.write("\x93NUMPY\x01\x00", 8);
        f.put(static_cast<char>(hl & 0xff));
        f.put(static_cast<char>(hl >> 8));
        f.write(header.data(), static_cast<std::streamsize>(header.size()));
        f.write(reinterpret_cast<char const*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
        if (!f)
            throw InputError(path + ": cannot write");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) // nothing half-written under the final name
        throw InputError(path + ": cannot write");
}

} // namespace cm_example
