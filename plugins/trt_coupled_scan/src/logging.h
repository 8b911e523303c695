// Logging through TensorRT's logger (found via the ILoggerFinder TensorRT hands to setLoggerFinder)
// and an opt-in call trace (env CM_DEPLOY_PLUGIN_TRACE=1) printed to stderr.
#pragma once

#include <NvInferRuntime.h>

#include <string>

namespace cm_deploy
{
namespace plugin
{

void setLoggerFinderImpl(nvinfer1::ILoggerFinder* finder);

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg);

inline void logError(std::string const& msg)
{
    logMessage(nvinfer1::ILogger::Severity::kERROR, msg);
}

inline void logWarning(std::string const& msg)
{
    logMessage(nvinfer1::ILogger::Severity::kWARNING, msg);
}

inline void logVerbose(std::string const& msg)
{
    logMessage(nvinfer1::ILogger::Severity::kVERBOSE, msg);
}

bool traceEnabled();

// Prints "[CoupledScan trace] <where> <detail>" to stderr and flushes, so that the last call before a
// crash inside TensorRT is visible.
void traceCall(char const* where, std::string const& detail = std::string());

} // namespace plugin
} // namespace cm_deploy

#define CM_TRACE(where, ...)                                                                                           \
    do                                                                                                                 \
    {                                                                                                                  \
        if (::cm_deploy::plugin::traceEnabled())                                                                       \
        {                                                                                                              \
            ::cm_deploy::plugin::traceCall(where, ##__VA_ARGS__);                                                      \
        }                                                                                                              \
    } while (0)
